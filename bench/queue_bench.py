"""jobd's own numbers: store round trip, enqueue rates, end-to-end throughput, latency.

    python bench/queue_bench.py [--jobs 20000] [--json out.json]

Starts its own Postgres (the embedded launcher, durable settings) in a temp dir and a
real `jobd run` process, so results do not depend on the machine's server settings.
Peers (procrastinate, pgqueuer, arq) are not in this script yet.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from actors.ports import NewJob  # noqa: E402
from bench.common import pct, rss_mb, wait_for  # noqa: E402
from daemon.embedded import EmbeddedPostgres  # noqa: E402
from daemon.store import PgStore, bridge  # noqa: E402
from tests.support import JobdProcess, Sql  # noqa: E402


async def store_numbers(url: str, results: dict) -> None:
    async with bridge.open_loop():
        store = PgStore(url, pool_min=2, pool_max=4)
        await store.connect()
        n = 2000
        t = time.perf_counter()
        for _ in range(n):
            await store.ping()
        results["store_round_trip_us"] = (time.perf_counter() - t) / n * 1e6

        t = time.perf_counter()
        for _ in range(n):
            await store.enqueue_many([NewJob(kind="noop", queue="warm", args="{}")])
        results["enqueue_single_store_jobs_per_s"] = n / (time.perf_counter() - t)

        total, batch = 100_000, 5000
        t = time.perf_counter()
        for _ in range(0, total, batch):
            await store.enqueue_many(
                [NewJob(kind="noop", queue="bulk", args="{}") for _ in range(batch)]
            )
        results["enqueue_bulk_jobs_per_s"] = total / (time.perf_counter() - t)
        await store.close()


def daemon_numbers(url: str, workdir: Path, jobs: int, results: dict) -> None:
    sql = Sql(url)
    sql.execute("TRUNCATE jobd.jobs, jobd.job_steps")
    daemon = JobdProcess(workdir / "d", url, queues={"default": {"concurrency": 200}},
                         jobs={"poll_interval": "2s"})
    daemon.start()
    try:
        pid = daemon.proc.pid
        time.sleep(1.0)
        results["daemon_idle_rss_mb"] = rss_mb(pid)

        # Latency on an idle daemon: one job at a time, spaced out.
        from protocol.client import SyncClient

        client = SyncClient(str(daemon.socket))
        for _ in range(200):
            client.enqueue("noop", {})
            time.sleep(0.01)
        wait_for(lambda: sql.fetchval(
            "SELECT count(*) FROM jobd.jobs WHERE state = 'completed'") == 200, 60)
        waits = [r[0] * 1000 for r in sql.fetch(
            "SELECT extract(epoch FROM started_at - created_at)::float8 FROM jobd.jobs")]
        results["enqueue_to_start_ms_p50"] = statistics.median(waits)
        results["enqueue_to_start_ms_p99"] = pct(waits, 0.99)

        # Single enqueues through the daemon (socket, one connection per call).
        import anyio

        from protocol.client import connect

        async def singles(n: int) -> float:
            async with connect(str(daemon.socket)) as c:
                t = time.perf_counter()
                for _ in range(n):
                    await c.enqueue("noop", {}, queue="parked")
                return n / (time.perf_counter() - t)

        results["enqueue_single_socket_jobs_per_s"] = anyio.run(singles, 2000)

        some_id = sql.fetchval("SELECT min(id) FROM jobd.jobs")

        async def get_rtt(n: int) -> float:
            async with connect(str(daemon.socket)) as c:
                t = time.perf_counter()
                for _ in range(n):
                    await c.get(some_id)
                return (time.perf_counter() - t) / n * 1e6

        results["get_socket_round_trip_us"] = anyio.run(get_rtt, 1000)
    finally:
        daemon.signal(15)
        daemon.wait(60)

    # Throughput: queue the jobs first, then let one fresh daemon chew through them.
    sql.execute("TRUNCATE jobd.jobs, jobd.job_steps")
    sql.execute(
        "INSERT INTO jobd.jobs (kind, queue, args) SELECT 'noop', 'default', '{}'"
        " FROM generate_series(1, $1)", jobs)
    commits_before = sql.fetchval(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    # Keep every finished row: retention pruning mid-run would shrink the timed span.
    daemon = JobdProcess(workdir / "e", url, queues={"default": {"concurrency": 200}},
                         extra_toml="[jobs.retention]\ncompleted_max_count = 10000000\n")
    t0 = time.perf_counter()
    daemon.start(wait=False)
    try:
        polls = 0

        def all_done() -> bool:
            nonlocal polls
            polls += 1
            return sql.fetchval(
                "SELECT count(*) FROM jobd.jobs WHERE state = 'completed'") == jobs

        wait_for(all_done, 600, 0.02)
        first, last = sql.fetch(
            "SELECT min(started_at), max(finished_at) FROM jobd.jobs")[0]
        results["e2e_jobs"] = jobs
        results["e2e_jobs_per_s"] = jobs / (last - first).total_seconds()
        results["e2e_wall_incl_startup_s"] = time.perf_counter() - t0
        polls += 1  # the min/max query above
        time.sleep(1.5)  # statistics reach pg_stat_database with a delay
        commits = sql.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        # Every statement jobd sends is its own transaction, so commits ~ round trips.
        # Our own polling is subtracted; jobd's startup queries remain in the count.
        results["e2e_db_transactions_per_job"] = (commits - commits_before - polls) / jobs
    finally:
        daemon.signal(15)
        daemon.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="jobd-bench-") as tmp:
        cluster = EmbeddedPostgres(Path(tmp) / "pg")
        cluster.start()
        try:
            url = cluster.create_database("bench")
            trio.run(store_numbers, url, results)
            daemon_numbers(url, Path(tmp), args.jobs, results)
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
