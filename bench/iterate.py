"""Quick loop for perf work: e2e (one daemon) and bulk enqueue, N reps, CPU split.

    .bench-venv/bin/python bench/iterate.py [--jobs 30000] [--reps 2] [--bulk 50000]

`--jobs 0` runs bulk enqueue only, `--bulk 0` e2e only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import jobd_bench as jb  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=30_000)
    ap.add_argument("--bulk", type=int, default=50_000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--claim-batch", type=int)
    ap.add_argument("--concurrency", type=int)
    args = ap.parse_args()
    extra = {k: v for k, v in (("claim_batch", args.claim_batch),
                               ("concurrency", args.concurrency)) if v} or None
    with jb.scratch("jobd-it-") as ctx:
        for _ in range(args.reps if args.jobs else 0):
            r = jb.e2e(ctx, args.jobs, extra_queue=extra)
            print("e2e", {k: round(v, 3) for k, v in r.items()}, flush=True)
        for _ in range(args.reps if args.bulk else 0):
            r = jb.enqueue(ctx, args.bulk, 0)
            print("enqueue", {k: round(v, 1) for k, v in r.items()}, flush=True)


if __name__ == "__main__":
    main()
