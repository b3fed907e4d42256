"""Quick loop for workflow perf work: scenario 6's suspend+resume, three-step workflows
end to end (`bench.wf3`) and no-op jobs end to end, on one daemon, N reps.

    .venv/bin/python bench/wf_iterate.py [--suspend 10000] [--jobs 10000] [--reps 2]
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
    ap.add_argument("--suspend", type=int, default=10_000)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    with jb.scratch("jobd-wf-") as ctx:
        for _ in range(args.reps):
            s = jb.workflows(ctx, args.suspend, steps=200)
            wf3 = jb.e2e(ctx, args.jobs, kind="bench.wf3")
            noop = jb.e2e(ctx, args.jobs)
            print({"suspend_jobs_per_s": round(s["suspend_jobs_per_s"]),
                   "suspend_daemon_cpu_ms": round(s["suspend_daemon_cpu_ms_per_job"], 3),
                   "wf3_jobs_per_s": round(wf3["jobs_per_s"]),
                   "wf3_daemon_cpu_s_per_1k": round(wf3["daemon_cpu_s_per_1k"], 3),
                   "noop_jobs_per_s": round(noop["jobs_per_s"]),
                   "wf3_over_noop": round(wf3["jobs_per_s"] / noop["jobs_per_s"], 3),
                   "step_load_ms": round(s["step_load_ms"], 2)}, flush=True)


if __name__ == "__main__":
    main()
