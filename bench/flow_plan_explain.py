"""The plans of jobd.claim_flow's nested statements in scenario 5 (flow limits that never
bind), logged by auto_explain, for the statements that took over 8 ms.

    .bench-venv/bin/python bench/flow_plan_explain.py [--runs 2] [--out F]

A throwaway embedded cluster with auto_explain preloaded for every session; `--runs`
end-to-end runs of 20,000 jobs over 50 keys (each truncates the table and loads it
again, as the bench does); then a summary of the slow statements and the plan of the
median key walk, written to `--out`.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import jobd_bench as jb  # noqa: E402
from bench.common import PgConn  # noqa: E402
from daemon.embedded import EmbeddedPostgres  # noqa: E402

SETUP = ["LOAD 'auto_explain'",
         "ALTER SYSTEM SET session_preload_libraries = 'auto_explain'",
         "ALTER SYSTEM SET auto_explain.log_min_duration = '8ms'",
         "ALTER SYSTEM SET auto_explain.log_nested_statements = on",
         "SELECT pg_reload_conf()"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("flow-walk-plan.txt"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="jobd-flow-plan-") as tmp:
        cluster = EmbeddedPostgres(Path(tmp) / "pg")
        cluster.start()
        try:
            admin = PgConn(cluster.url("postgres"))
            for statement in SETUP:
                admin.execute(statement)
            admin.close()
            ctx = jb.Ctx(cluster.create_database("jobd"), cluster.url("postgres"), "jobd",
                         cluster.pid, Path(tmp) / "w")
            boot = ctx.daemon()
            boot.start()  # migrations
            jb.stop([boot])
            runs = [jb.e2e(ctx, 20_000, keys=50, extra_queue=jb.FLOW_QUEUE)
                    for _ in range(args.runs)]
            ctx.close()
            log = cluster.logfile.read_text()
        finally:
            cluster.stop()
    entries = log.split("LOG:  duration:")[1:]
    kinds: collections.Counter[str] = collections.Counter()
    for entry in entries:
        text = re.search(r"Query Text: (.{0,300})", entry, re.S)
        kinds[" ".join(text.group(1).split())[:90] if text else "?"] += 1
    walks = [e for e in entries if "SELECT array_agg(c.key" in e[:600]]
    out = [f"runs: {[round(r['jobs_per_s']) for r in runs]} jobs/s",
           "statements over 8 ms, by their first words:",
           *(f"  {n:5d}  {k}" for k, n in kinds.most_common(8))]
    if walks:
        walks.sort(key=lambda e: float(e.split(" ms")[0]))
        median = walks[len(walks) // 2]
        out += [f"key walks over 8 ms: {len(walks)}, median "
                f"{float(median.split(' ms')[0]):.1f} ms; the median one's plan nodes:"]
        out += [line for line in median.splitlines()
                if any(w in line for w in ("->", "Cond", "Filter")) and len(line) < 400][:40]
    args.out.write_text("\n".join(out) + "\n")
    print("\n".join(out[:12]))


if __name__ == "__main__":
    main()
