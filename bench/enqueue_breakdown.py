"""Where one sequential socket enqueue's time goes: the client's CPU, each daemon
thread's (trio's, the store's asyncio loop), Postgres', and the syscalls the daemon
makes per request.

    .bench-venv/bin/python bench/enqueue_breakdown.py [--jobs 3000] [--reps 3] [--strace]

The jobs go into a queue no daemon serves, so nothing runs; every round starts a fresh
daemon on a throwaway embedded cluster. `--strace` (strace on PATH) counts the daemon's
syscalls by name over one more round: strace slows the daemon, so that round's times
are not reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import jobd_bench as jb  # noqa: E402
from bench.common import pg_cluster_cpu, thread_cpu  # noqa: E402


def start_strace(pid: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
                            stderr=subprocess.DEVNULL)


def one_round(ctx: jb.Ctx, jobs: int, strace: Path | None = None) -> dict:
    d = ctx.daemon()
    d.start()
    try:
        async def run(c) -> dict:
            for _ in range(300):  # warm: prepared statements, pool, caches
                await c.enqueue("noop", {}, queue="parked")
            tracer = None
            if strace is not None:
                tracer = start_strace(d.proc.pid, strace)
                await anyio.sleep(1.0)  # attached
            threads0, pg0 = thread_cpu(d.proc.pid), pg_cluster_cpu(ctx.postmaster)
            cpu0, t0 = time.process_time(), time.perf_counter()
            for _ in range(jobs):
                await c.enqueue("noop", {}, queue="parked")
            wall = time.perf_counter() - t0
            cpu, threads1 = time.process_time() - cpu0, thread_cpu(d.proc.pid)
            pg = pg_cluster_cpu(ctx.postmaster) - pg0
            if tracer is not None:
                tracer.send_signal(signal.SIGINT)
                tracer.wait(30)
            main = next(k for k in threads1 if k.endswith(f"/{d.proc.pid}"))
            per = {k: 1e6 * (v - threads0.get(k, 0.0)) / jobs for k, v in threads1.items()}
            return {"jobs_per_s": jobs / wall, "wall_us": 1e6 * wall / jobs,
                    "client_us": 1e6 * cpu / jobs, "daemon_trio_us": per.pop(main),
                    "daemon_other_threads_us": sum(per.values()),
                    "postgres_us": 1e6 * pg / jobs}
        return jb._client_call(d.socket, run)
    finally:
        jb.stop([d])
        ctx.reset()


def syscalls(path: Path, jobs: int) -> dict[str, float]:
    per: dict[str, float] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            per[parts[-1]] = round(int(parts[3]) / jobs, 2)
    return per


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--strace", action="store_true")
    args = ap.parse_args()
    with jb.scratch("jobd-breakdown-") as ctx:
        for _ in range(args.reps):
            print(json.dumps({k: round(v, 1) for k, v in one_round(ctx, args.jobs).items()}),
                  flush=True)
        if args.strace and shutil.which("strace"):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "strace.txt"
                one_round(ctx, args.jobs, strace=out)
                print(json.dumps({"syscalls_per_enqueue": syscalls(out, args.jobs)}))


if __name__ == "__main__":
    main()
