"""Cost of the flow-control tools' enqueue paths, and of plain enqueues before/after.

    python bench/flow_tools_bench.py --tree /work/main --plain-only   # plain, the old tree
    python bench/flow_tools_bench.py                                  # plain + tools, this tree

One daemon on a throwaway embedded cluster; every kind sits on the unserved queue
`parked`, so nothing runs and each number is the enqueue alone. Per path: sequential
single enqueues over the socket (jobs/s), batches of 1,000 (`enqueue_batch`, jobs/s),
and the daemon's and Postgres' CPU per enqueue in the batch run. Debounce spreads its
enqueues over 100 keys (99% collapse into a pending run), batching over 100 keys with
batch_size 100 (1% open a batch job). Prints one JSON object and writes it to
bench/results/flow-tools-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--single", type=int, default=2000)
    ap.add_argument("--bulk", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--plain-only", action="store_true", help="only jobd_bench's plain enqueue")
    ap.add_argument("--e2e", type=int, default=0,
                    help="also run N plain noop jobs through claim and finish (jobd_bench.e2e)")
    args = ap.parse_args()
    tree = args.tree.resolve()
    sys.path.insert(0, str(tree))
    from bench import jobd_bench as jb
    from bench.common import pg_cluster_cpu, proc_cpu
    from protocol.jobs import JobSpec
    from tests.support import JobdProcess

    def tools_run(ctx, kind: str) -> dict:
        ctx.reset()
        ctx.sql.execute("TRUNCATE jobd.batch_items, jobd.throttle_keys")
        d = JobdProcess(ctx.workdir / f"t-{kind}-{time.monotonic_ns()}", ctx.url,
                        modules=[*jb.MODULES, "bench.flow_tools_handlers"])
        d.start()
        try:
            async def single(c) -> float:
                t = time.perf_counter()
                for n in range(args.single):
                    await c.enqueue(kind, {"k": f"k{n % 100}", "n": n})
                return args.single / (time.perf_counter() - t)

            out: dict[str, float] = {}

            async def bulk(c) -> float:
                cpu0, pg0 = proc_cpu(d.proc.pid), pg_cluster_cpu(ctx.postmaster)
                t = time.perf_counter()
                for start in range(0, args.bulk, 1000):
                    await c.enqueue_batch([JobSpec(kind=kind, args={"k": f"k{n % 100}", "n": n})
                                           for n in range(start, min(start + 1000, args.bulk))])
                wall = time.perf_counter() - t
                out["bulk_daemon_us_per_job"] = 1e6 * (proc_cpu(d.proc.pid) - cpu0) / args.bulk
                out["bulk_pg_us_per_job"] = 1e6 * (pg_cluster_cpu(ctx.postmaster) - pg0) / args.bulk
                return args.bulk / wall

            out["single_jobs_per_s"] = jb._client_call(d.socket, single)
            out["bulk_jobs_per_s"] = jb._client_call(d.socket, bulk)
            out["jobs_rows"] = ctx.sql.fetchval("SELECT count(*) FROM jobd.jobs")
            return {k: round(v, 1) for k, v in out.items()}
        finally:
            jb.stop([d])

    results: dict = {"tree": str(tree), "single": args.single, "bulk": args.bulk, "rounds": []}
    with jb.scratch("jobd-flowtools-") as ctx:
        for _ in range(args.rounds):
            one: dict = {"plain_jobd_bench": {
                k: round(v, 1) for k, v in jb.enqueue(ctx, bulk=args.bulk,
                                                      single=args.single).items()}}
            if args.e2e:
                one["plain_e2e"] = {k: round(v, 3) for k, v in jb.e2e(ctx, args.e2e).items()}
            if not args.plain_only:
                for kind in ("bench.plain", "bench.debounced", "bench.batched"):
                    one[kind] = tools_run(ctx, kind)
            results["rounds"].append(one)
            print(json.dumps(one), flush=True)
    out_dir = Path(__file__).resolve().parent / "results"
    name = "flow-tools-" + ("plain-" if args.plain_only else "") + time.strftime(
        "%Y%m%dT%H%M%SZ", time.gmtime()) + ".json"
    (out_dir / name).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote bench/results/{name}")


if __name__ == "__main__":
    main()
