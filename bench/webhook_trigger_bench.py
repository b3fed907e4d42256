"""What the outbox trigger costs a finish statement: batches of 200 running jobs
finished by one UPDATE (the completer's shape), alternating rounds: without the trigger
(as before migration 0017), with it disabled (jobd with no webhooks anywhere), enabled
with no subscription, with one subscription that matches nothing (kinds filter), and
one that matches every row (an outbox row and a NOTIFY each).

    python bench/webhook_trigger_bench.py [--jobs 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg

from daemon.embedded import EmbeddedPostgres
from daemon.store.migrate import apply

BATCH = 200
TRIGGER = """
CREATE TRIGGER jobs_webhooks AFTER UPDATE OF state ON jobd.jobs
    FOR EACH ROW WHEN (NEW.state IN ('completed', 'failed', 'cancelled')
                       AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION jobd.webhook_after_finish()
"""
FINISH = """
UPDATE jobd.jobs j SET state = 'completed', finished_at = now(), result = '{"ok": true}'
WHERE j.id = ANY($1::bigint[]) AND j.state = 'running'
"""


async def round_(conn: asyncpg.Connection, jobs: int) -> float:
    await conn.execute("TRUNCATE jobd.jobs, jobd.job_steps, jobd.webhook_outbox")
    ids = await conn.fetch(
        "INSERT INTO jobd.jobs (kind, state, attempt, started_at) "
        "SELECT 'noop', 'running', 1, now() FROM generate_series(1, $1) RETURNING id", jobs)
    ids = [r["id"] for r in ids]
    await conn.execute("VACUUM ANALYZE jobd.jobs")
    started = time.perf_counter()
    for i in range(0, len(ids), BATCH):
        await conn.execute(FINISH, ids[i:i + BATCH])
    return (time.perf_counter() - started) / len(ids) * 1e6


async def main(url: str, jobs: int, rounds: int) -> None:
    conn = await asyncpg.connect(url)
    await apply(conn)
    cases = {
        "no trigger (main)": ("DROP", None),
        "trigger disabled": ("DISABLE", None),
        "no subscriptions": ("ENABLE", None),
        "one, matching none": ("ENABLE", ["other.kind"]),
        "one, matching all": ("ENABLE", []),
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (mode, kinds) in cases.items():
            await conn.execute("DROP TRIGGER IF EXISTS jobs_webhooks ON jobd.jobs")
            if mode != "DROP":
                await conn.execute(TRIGGER)
                await conn.execute(f"ALTER TABLE jobd.jobs {mode} TRIGGER jobs_webhooks")
            await conn.execute("DELETE FROM jobd.webhooks")
            if kinds is not None:
                await conn.execute(
                    "INSERT INTO jobd.webhooks (name, events, kinds) VALUES "
                    "('w', ARRAY['completed', 'failed', 'cancelled'], $1)", kinds)
            results[name].append(await round_(conn, jobs))
    for name, values in results.items():
        print(f"{name:22s} median {statistics.median(values):6.1f} us/job  "
              f"({', '.join(f'{v:.1f}' for v in values)})")
    await conn.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="jobd-bench-pg-"))
    cluster = EmbeddedPostgres(root, fast=True)
    cluster.start()
    try:
        asyncio.run(main(cluster.create_database("bench"), a.jobs, a.rounds))
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
