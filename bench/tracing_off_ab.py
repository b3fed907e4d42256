"""Tracing off against a tree without tracing: no-op jobs end to end, the daemon's code
alternated run by run on ONE cluster migrated by this tree (an older tree's daemon runs on
the newer schema unchanged), so only the code differs between the two.

    git archive <commit> | tar -x -C /tmp/other
    PYTHONPATH=. .venv/bin/python -m bench.tracing_off_ab --other /tmp/other --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tests.support as support
from bench import tracing_cost
from bench.jobd_bench import scratch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", type=Path, required=True, help="an export of the other tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    trees = {"this": support.ROOT, "other": args.other.resolve()}
    receiver = tracing_cost.Receiver()
    runs: list[dict[str, Any]] = []
    with scratch("jobd-tracing-off-ab-") as ctx:
        for r in range(args.rounds):
            for name, root in trees.items():
                support.ROOT = root  # JobdProcess starts `daemon.main` from this tree
                result = tracing_cost.run(ctx, "off", args.jobs, receiver, r)
                result["tree"] = name
                runs.append(result)
                print(json.dumps(result), flush=True)
    summary = {name: {
        "jobs_per_s_median": statistics.median(x["jobs_per_s"] for x in runs if x["tree"] == name),
        "daemon_cpu_us_per_job_median": statistics.median(
            x["daemon_cpu_us_per_job"] for x in runs if x["tree"] == name),
        "pg_cpu_us_per_job_median": statistics.median(
            x["pg_cpu_us_per_job"] for x in runs if x["tree"] == name),
    } for name in trees}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or support.ROOT / "bench" / "results" / f"tracing-off-ab-{stamp}.json"
    out.write_text(json.dumps({"other": str(args.other), "runs": runs, "summary": summary},
                              indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
