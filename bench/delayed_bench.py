"""How late delayed jobs and schedule fires start on an idle daemon.

    python bench/delayed_bench.py [--jobs 200] [--json out.json]

Starts its own Postgres and one real `jobd run`. Delayed jobs: `--jobs` noop jobs are
enqueued one at a time, 10 ms apart, each with a random delay of 0.2-2 s, so jobs
enqueued later are often due *before* the one the dispatcher is sleeping for (the
enqueue NOTIFY must wake it early). Lateness is `started_at - run_at` (the claim's
time minus the due time, both on the database's clock). Schedules: an `every = "1s"`
schedule runs for 10 s; lateness is `started_at - fire_at`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from bench.common import pct, wait_for  # noqa: E402
from daemon.embedded import EmbeddedPostgres  # noqa: E402
from protocol import commands as c  # noqa: E402
from protocol.client import connect  # noqa: E402
from protocol.schedules import ScheduleSpec  # noqa: E402
from tests.support import JobdProcess, Sql  # noqa: E402


def run(url: str, workdir: Path, jobs: int, results: dict) -> None:
    sql = Sql(url)
    daemon = JobdProcess(workdir / "d", url, queues={"default": {"concurrency": 200}},
                         jobs={"poll_interval": "2s"})
    daemon.start()
    try:
        time.sleep(1.0)  # idle
        rng = random.Random(7)

        async def enqueue_delayed() -> None:
            async with connect(str(daemon.socket)) as client:
                for _ in range(jobs):
                    await client.enqueue("noop", {}, delay_s=rng.uniform(0.2, 2.0))
                    await anyio.sleep(0.01)

        anyio.run(enqueue_delayed)
        wait_for(lambda: sql.fetchval(
            "SELECT count(*) FROM jobd.jobs WHERE state = 'completed'") == jobs, 60)
        late = [r[0] * 1000 for r in sql.fetch(
            "SELECT extract(epoch FROM started_at - run_at)::float8 FROM jobd.jobs")]
        results["delayed_jobs"] = jobs
        results["delayed_start_late_ms_p50"] = statistics.median(late)
        results["delayed_start_late_ms_p99"] = pct(late, 0.99)
        results["delayed_start_late_ms_max"] = max(late)
        results["delayed_start_early_jobs"] = sum(1 for x in late if x < 0)

        sql.execute("DELETE FROM jobd.jobs")

        async def add_schedule() -> None:
            async with connect(str(daemon.socket)) as client:
                await client.call(c.ScheduleAdd(
                    schedule=ScheduleSpec(name="bench", kind="noop", every="1s")))

        anyio.run(add_schedule)
        time.sleep(10.5)
        rows = sql.fetch(
            "SELECT extract(epoch FROM j.created_at - f.fire_at)::float8 AS fired,"
            "       extract(epoch FROM j.started_at - f.fire_at)::float8 AS started"
            " FROM jobd.schedule_fires f JOIN jobd.jobs j ON j.id = f.job_id"
            " WHERE j.started_at IS NOT NULL")
        fired = [r["fired"] * 1000 for r in rows]
        started = [r["started"] * 1000 for r in rows]
        results["schedule_fires"] = len(rows)
        results["schedule_fire_late_ms_p50"] = statistics.median(fired)
        results["schedule_fire_late_ms_max"] = max(fired)
        results["schedule_start_late_ms_p50"] = statistics.median(started)
        results["schedule_start_late_ms_max"] = max(started)
    finally:
        daemon.signal(15)
        daemon.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="jobd-bench-") as tmp:
        cluster = EmbeddedPostgres(Path(tmp) / "pg")
        cluster.start()
        try:
            run(cluster.create_database("bench"), Path(tmp), args.jobs, results)
        finally:
            cluster.stop()
    width = max(map(len, results))
    for key, value in results.items():
        shown = f"{value:,.1f}" if isinstance(value, float) else str(value)
        print(f"{key:{width}}  {shown}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
