"""The dashboard's reads on a seeded table of 1,000,000 jobs: EXPLAIN ANALYZE of `activity`,
`inspect` (a parent with 500 children and 60 steps) and the `error` filter (a list page
and a summary), each the median of 5 runs after a warm-up, with the plan's index use.

    python bench/dashboard_bench.py [rows]
"""

from __future__ import annotations

import asyncio
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from daemon.embedded import EmbeddedPostgres  # noqa: E402
from daemon.store import migrate  # noqa: E402
from daemon.store.sql import control, runs  # noqa: E402

# 10 queues x 3 priorities; 70% completed and 10% failed over the last 24 hours (failed
# ones with a message and a traceback), 15% available (due), 5% scheduled (tomorrow).
SEED = """
INSERT INTO jobd.jobs (queue, kind, priority, state, run_at, finished_at, errors, created_at)
SELECT 'q' || (i % 10), 'kind' || (i % 7), (i % 3)::smallint,
       CASE WHEN i % 20 < 14 THEN 'completed' WHEN i % 20 < 16 THEN 'failed'
            WHEN i % 20 < 19 THEN 'available' ELSE 'scheduled' END,
       CASE WHEN i % 20 = 19 THEN now() + interval '1 day'
            ELSE now() - (i % 86400) * interval '1 second' END,
       CASE WHEN i % 20 < 16 THEN now() - (i % 86400) * interval '1 second' END,
       CASE WHEN i % 20 IN (14, 15) THEN jsonb_build_array(jsonb_build_object(
           'attempt', 1, 'class', 'unknown', 'message', 'upstream said ' || (i % 1000),
           'traceback', repeat('  File "app/handlers.py", line 12, in run' || E'\\n', 8)))
            ELSE '[]'::jsonb END,
       now() - (i % 86400) * interval '1 second'
FROM generate_series(1, $1) i
"""

PARENT = """
WITH p AS (INSERT INTO jobd.jobs (queue, kind, state, waiting_on)
           VALUES ('q0', 'flow', 'waiting', '{"type": "children", "ids": []}') RETURNING id),
k AS (INSERT INTO jobd.jobs (queue, kind, state, parent_id, result)
      SELECT 'q0', 'child', 'completed', p.id, to_jsonb(repeat('r', (g % 3) * 3000))
      FROM p, generate_series(1, 500) g),
s AS (INSERT INTO jobd.job_steps (job_id, name, result, attempts, started_at, finished_at)
      SELECT p.id, 's' || g, to_jsonb(repeat('x', (g % 4) * 2000)), 1,
             now() - interval '1 minute', now() - interval '30 seconds'
      FROM p, generate_series(1, 60) g)
SELECT id FROM p
"""


def filter_args(error: str) -> list:
    return [None] * 11 + [error]


async def explain(conn: asyncpg.Connection, name: str, sql: str, *args) -> None:
    times, plan = [], ""
    for i in range(6):
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
        plan = "\n".join(r[0] for r in rows)
        if i:  # the first warms the cache
            times.append(float(re.search(r"Execution Time: ([\d.]+) ms", plan).group(1)))
    indexes = sorted(set(re.findall(r"(?:using|Index Scan on) (jobs\w*)", plan)))
    seq = "Seq Scan on jobs" in plan
    print(f"{name:34} median {statistics.median(times):8.2f} ms  (min {min(times):.2f}, "
          f"max {max(times):.2f})  indexes {indexes}{'  SEQ SCAN' if seq else ''}")
    if "-v" in sys.argv:
        print(plan)


async def run(url: str, n: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate.apply(conn)
        await conn.execute(SEED, n)
        parent = await conn.fetchval(PARENT)
        await conn.execute("VACUUM ANALYZE jobd.jobs")
        await conn.execute("VACUUM ANALYZE jobd.job_steps")
        total = await conn.fetchval("SELECT count(*) FROM jobd.jobs")
        print(f"{total} rows in jobd.jobs; parent {parent} with 500 children, 60 steps")
        await explain(conn, "activity", runs.ACTIVITY, 300, 12)
        await explain(conn, "inspect (500 children, 60 steps)", runs.INSPECT_RUN,
                      parent, 4096, 100, 1000)
        await explain(conn, "list --error (50, matches)", control.LIST_JOBS,
                      *filter_args("UPSTREAM SAID 7"), None, 50, 4096)
        await explain(conn, "list --error (no match: full scan)", control.LIST_JOBS,
                      *filter_args("no such text"), None, 50, 4096)
        await explain(conn, "summary --error --state failed", control.SUMMARIZE_JOBS,
                      *([None] * 3 + [["failed"]] + [None] * 7 + ["said 7"]))
    finally:
        await conn.close()


def main() -> None:
    n = int(next((a for a in sys.argv[1:] if a.isdigit()), "1000000"))
    with tempfile.TemporaryDirectory(prefix="jobd-dashboard-bench-") as tmp:
        cluster = EmbeddedPostgres(Path(tmp) / "pg")
        cluster.start()
        try:
            asyncio.run(run(cluster.create_database("bench"), n))
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
