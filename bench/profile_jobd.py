"""Where jobd's time goes in the throughput scenarios: py-spy on a real daemon.

    .bench-venv/bin/python bench/profile_jobd.py [--jobs 100000] [--out bench/results/profile]

Runs (1) bulk enqueue through the socket and (2) end-to-end no-op jobs on one daemon,
each under `py-spy record --nonblocking` (collapsed stacks), and prints the top
functions by own time and by inclusive time, plus Postgres' plan for one claim.
"""

from __future__ import annotations

import argparse
import collections
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import jobd_bench as jb  # noqa: E402
from bench.common import wait_for  # noqa: E402
from protocol.jobs import JobSpec  # noqa: E402


def spy(pid: int, out: Path) -> subprocess.Popen:
    pyspy = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen([str(pyspy), "record", "--pid", str(pid), "--nonblocking",
                             "--rate", "250", "--format", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize(path: Path, top: int = 25) -> str:
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        n = int(n)
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].split("/")[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    lines = [f"{total} samples", "-- own time --"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["-- inclusive --"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top + 15)]
    return "\n".join(lines)


def claim_probe(ctx, depth: int) -> tuple[int, float, list[str]]:
    """Run jobd's own CLAIM statement 45 times at the head of a `depth`-deep queue."""
    import statistics

    from daemon.store.sql import jobs as q

    ctx.reset()
    ctx.insert(depth)
    ctx.sql.execute("VACUUM ANALYZE jobd.jobs")
    args = ("default", 200, "probe", 30.0, None, ["noop"], [])
    times = []
    for _ in range(45):
        t = time.perf_counter()
        ctx.sql.fetch(q.CLAIM, *args)
        times.append((time.perf_counter() - t) * 1000)
    sql = q.CLAIM.replace("$1", "'default'").replace("$2", "200").replace("$3", "'probe'")
    sql = sql.replace("$4", "30.0").replace("$5::timestamptz", "NULL::timestamptz")
    sql = sql.replace("$6::text[]", "'{noop}'::text[]").replace("$7::text[]", "'{}'::text[]")
    plan = [r[0] for r in ctx.sql.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql)]
    ctx.reset()
    return depth, statistics.median(times), plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--depth", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with jb.scratch("jobd-prof-") as ctx:
        # (1) bulk enqueue through the socket
        d = ctx.daemon()
        d.start()
        p = spy(d.proc.pid, args.out / "enqueue.txt")
        time.sleep(1)

        async def bulk(c) -> float:
            t = time.perf_counter()
            for _ in range(args.jobs // 5000):
                await c.enqueue_batch([JobSpec(kind="noop", queue="parked")] * 5000)
            return args.jobs / (time.perf_counter() - t)

        print(f"bulk enqueue under py-spy: {jb._client_call(d.socket, bulk):,.0f} jobs/s")
        p.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        p.wait(60)
        jb.stop([d])
        ctx.reset()
        t = time.perf_counter()
        ctx.insert(args.jobs)
        print(f"plain INSERT ... SELECT generate_series: "
              f"{args.jobs / (time.perf_counter() - t):,.0f} rows/s")
        ctx.reset()
        # (2) end to end
        d = ctx.daemon()
        d.start()
        jb._client_call(d.socket, lambda c: c.pause("default"))
        time.sleep(1)
        ctx.insert(args.jobs)
        ctx.sql.execute("ANALYZE jobd.jobs")
        plan = ctx.sql.fetch(
            "EXPLAIN (ANALYZE, BUFFERS) WITH picked AS (SELECT id FROM jobd.jobs"
            " WHERE queue = 'default' AND state IN ('available', 'scheduled')"
            " AND run_at <= now() AND kind = ANY('{noop}') ORDER BY priority, run_at, id"
            " LIMIT 200 FOR UPDATE SKIP LOCKED) SELECT count(*) FROM picked")
        p = spy(d.proc.pid, args.out / "e2e.txt")
        time.sleep(1)
        t = time.perf_counter()
        jb._client_call(d.socket, lambda c: c.resume("default"))
        wait_for(lambda: not ctx.sql.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM jobd.jobs WHERE {jb.UNFINISHED})"), 600, 0.1)
        print(f"e2e under py-spy: {args.jobs / (time.perf_counter() - t):,.0f} jobs/s")
        p.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        p.wait(60)
        jb.stop([d])
        probes = [claim_probe(ctx, k) for k in (10_000, args.depth)] if args.depth else []
    print("\nclaim plan (200 of the queued jobs):")
    print("\n".join(r[0] for r in plan))
    for depth, ms, explain in probes:
        print(f"\nCLAIM of 200 (daemon.store.sql.jobs.CLAIM) with {depth:,} queued: "
              f"{ms:.2f} ms per statement (median of 45 in a row); plan of the next one:")
        print("\n".join(explain))
    for name in ("enqueue", "e2e"):
        print(f"\n==== {name} (py-spy, daemon process) ====")
        print(summarize(args.out / f"{name}.txt"))


if __name__ == "__main__":
    main()
