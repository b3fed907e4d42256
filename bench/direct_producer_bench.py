"""Sequential single enqueues: the direct producer against the socket client (and
pgqueuer's single `Queries.enqueue`, if a python with pgqueuer is given).

One embedded cluster, one daemon serving the queue (paused: nothing runs, and neither
path needs an "is anyone serving this queue" round trip per enqueue); each round runs
every system once, the order rotating, so the VM's drift hits all alike:

    .venv/bin/python bench/direct_producer_bench.py --jobs 2000 --rounds 3 \\
        --pgqueuer-python /path/to/venv-with-pgqueuer/bin/python

Prints one JSON line per measurement (jobs/s, and the producing process's CPU per job)
and a summary of medians. pgqueuer runs in its own process on a database of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent


def pgqueuer_child(url: str, jobs: int) -> None:
    """In the pgqueuer venv: install, then time `jobs` single enqueues on one connection."""
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    async def main() -> None:
        conn = await asyncpg.connect(url)
        queries = Queries(AsyncpgDriver(conn))
        try:
            await queries.install()
        except Exception:  # noqa: BLE001 - installed by an earlier round
            pass
        await queries.clear_queue()
        cpu, started = time.process_time(), time.perf_counter()
        for _ in range(jobs):
            await queries.enqueue("noop", b"{}", 0)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        await conn.close()
        print(json.dumps({"wall": wall, "cpu": cpu}))

    asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pgqueuer-python", help="a python that can import pgqueuer")
    ap.add_argument("--pgqueuer-child", nargs=2, metavar=("URL", "JOBS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pgqueuer_child:
        pgqueuer_child(args.pgqueuer_child[0], int(args.pgqueuer_child[1]))
        return

    sys.path.insert(0, str(ROOT))
    import anyio

    from bench import jobd_bench as jb
    from daemon.producer import DirectProducer
    from protocol.client import connect

    async def by_socket(sock: Path, n: int) -> tuple[float, float]:
        async with connect(str(sock)) as client:
            cpu, started = time.process_time(), time.perf_counter()
            for _ in range(n):
                await client.enqueue("noop", {})
            return time.perf_counter() - started, time.process_time() - cpu

    async def by_direct(url: str, n: int) -> tuple[float, float]:
        async with DirectProducer(url, modules=["examples.basic"]) as producer:
            await producer.enqueue("noop", {})  # settings and live queues read once
            cpu, started = time.process_time(), time.perf_counter()
            for _ in range(n):
                await producer.enqueue("noop", {})
            return time.perf_counter() - started, time.process_time() - cpu

    results: dict[str, list[float]] = {}
    with jb.scratch("jobd-direct-") as ctx:
        pgq_url = None
        if args.pgqueuer_python:
            ctx.sql.execute("CREATE DATABASE pgq")
            pgq_url = urlunsplit(urlsplit(ctx.url)._replace(path="/pgq"))
        d = ctx.daemon()
        d.start()
        try:
            jb._client_call(d.socket, lambda c: c.pause("default"))
            systems = ["direct", "socket"] + (["pgqueuer"] if pgq_url else [])
            for r in range(args.rounds):
                order = systems[r % len(systems):] + systems[:r % len(systems)]
                for system in order:
                    ctx.sql.execute("TRUNCATE jobd.jobs, jobd.job_steps")
                    if system == "socket":
                        wall, cpu = anyio.run(by_socket, d.socket, args.jobs)
                    elif system == "direct":
                        wall, cpu = asyncio.run(by_direct(ctx.url, args.jobs))
                    else:
                        out = subprocess.run(
                            [args.pgqueuer_python, __file__, "--pgqueuer-child", pgq_url,
                             str(args.jobs)], capture_output=True, text=True)
                        if out.returncode:
                            raise SystemExit(f"pgqueuer failed:\n{out.stderr}")
                        got = json.loads(out.stdout.strip().splitlines()[-1])
                        wall, cpu = got["wall"], got["cpu"]
                    rate = args.jobs / wall
                    results.setdefault(system, []).append(rate)
                    print(json.dumps({"round": r + 1, "system": system, "jobs": args.jobs,
                                      "jobs_per_s": round(rate),
                                      "producer_cpu_us_per_job": round(1e6 * cpu / args.jobs)}),
                          flush=True)
        finally:
            jb.stop([d])
    print(json.dumps({"median_jobs_per_s": {s: round(statistics.median(v))
                                            for s, v in results.items()},
                      "range_jobs_per_s": {s: [round(min(v)), round(max(v))]
                                           for s, v in results.items()}}))


if __name__ == "__main__":
    main()
