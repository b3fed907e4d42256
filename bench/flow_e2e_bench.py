"""Scenario 5 alone: no-op jobs over 50 keys with limits that never bind vs no limits,
alternating in one embedded cluster so both see the same machine.

    python -m bench.flow_e2e_bench [--jobs 20000] [--reps 3] [--stale-stats]

--stale-stats: before each run the table is analysed while it holds only finished jobs
and autovacuum is off for it, so every run plans from the statistics of an empty queue
(what some runs of the full bench met by chance before migration 0021).
--keyless-row: the queue has had jobs without a key (its '' row in jobd.flow_keys), so
each flow claim also looks for those, reading past the keyed jobs ahead of them.

Each limits run also prints what jobd.claim_flow cost inside it: calls and milliseconds
per call (Postgres' own function statistics, track_functions = 'pl').
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import jobd_bench as jb  # noqa: E402


def stale_statistics(ctx: jb.Ctx) -> None:
    ctx.sql.execute("ALTER TABLE jobd.jobs SET (autovacuum_enabled = false)")
    ctx.reset()
    ctx.sql.execute("INSERT INTO jobd.jobs (kind, queue, state, finished_at) "
                    "SELECT 'noop', 'default', 'completed', now() FROM generate_series(1, 2000)")
    ctx.sql.execute("ANALYZE jobd.jobs")


def claim_flow_totals(ctx: jb.Ctx) -> tuple[int, float]:
    row = ctx.sql.fetch("SELECT coalesce(sum(calls), 0) AS calls, "
                        "coalesce(sum(total_time), 0) AS ms FROM pg_stat_user_functions "
                        "WHERE schemaname = 'jobd' AND funcname = 'claim_flow'")[0]
    return int(row["calls"]), float(row["ms"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--keys", type=int, default=50)
    ap.add_argument("--stale-stats", action="store_true")
    ap.add_argument("--keyless-row", action="store_true")
    args = ap.parse_args()
    runs: dict[str, list[float]] = {"none": [], "limits": []}
    with jb.scratch("jobd-flow-") as ctx:
        ctx.sql.execute(f"ALTER DATABASE {ctx.dbname} SET track_functions = 'pl'")
        for _ in range(args.reps):
            for name, extra in (("none", None), ("limits", jb.FLOW_QUEUE)):
                if args.stale_stats:
                    stale_statistics(ctx)
                calls0, ms0 = claim_flow_totals(ctx)
                r = jb.e2e(ctx, args.jobs, keys=args.keys, extra_queue=extra,
                           keyless_row=args.keyless_row)
                calls1, ms1 = claim_flow_totals(ctx)
                runs[name].append(r["jobs_per_s"])
                if calls1 > calls0:
                    r["claim_flow_calls"] = calls1 - calls0
                    r["claim_flow_ms_per_call"] = (ms1 - ms0) / (calls1 - calls0)
                print(name, {k: round(v, 3) for k, v in r.items()}, flush=True)
    base, lim = statistics.median(runs["none"]), statistics.median(runs["limits"])
    print(f"median jobs/s: no limits {base:,.0f}, limits {lim:,.0f} "
          f"({(lim / base - 1) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
