"""What a throughput run waits on: Postgres' wait events per statement and the daemon's
threads, sampled in the middle of an end-to-end run on one daemon.

    .bench-venv/bin/python bench/wait_profile.py [--kind bench.wf3] [--jobs 60000] [--flow]

While the run is past its start, every 10 ms for `--samples` rounds: each active backend
of the bench database as `wait event : statement` (`cpu` when it waits on nothing), and
the CPU share of each daemon thread over the sampled window. A statement that spends its
samples on `IO:WALSync`/`LWLock:WALWrite` waits for its commit's flush; `cpu` ones run.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import jobd_bench as jb  # noqa: E402
from bench.common import PgConn, thread_cpu  # noqa: E402

ACTIVE = """
SELECT coalesce(wait_event_type || ':' || wait_event, 'cpu') AS waiting,
       regexp_replace(left(query, 48), '\\s+', ' ', 'g') AS statement
FROM pg_stat_activity
WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid()
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="bench.wf3")
    ap.add_argument("--jobs", type=int, default=60_000)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--after", type=float, default=6.0, help="seconds after the start")
    ap.add_argument("--flow", action="store_true", help="50 keys with never-binding limits")
    args = ap.parse_args()
    found: dict = {}
    start = jb.JobdProcess.start

    def sampled_start(self, *a, **k):  # type: ignore[no-untyped-def]
        started = start(self, *a, **k)
        if getattr(self, "_sampled", False) or not found.get("armed"):
            return started
        self._sampled = True

        def sample() -> None:
            time.sleep(args.after)
            conn = PgConn(found["url"])
            waits: collections.Counter[tuple[str, str]] = collections.Counter()
            t0, cpu0 = time.perf_counter(), thread_cpu(self.proc.pid)
            for _ in range(args.samples):
                try:
                    active = conn.fetch(ACTIVE)
                except Exception:  # noqa: BLE001 - the run ended first: keep what we have
                    break
                for r in active:
                    waits[r["waiting"], r["statement"]] += 1
                time.sleep(0.01)
            span, cpu1 = time.perf_counter() - t0, thread_cpu(self.proc.pid)
            conn.close()
            found["waits"] = waits
            found["threads"] = {k: (v - cpu0.get(k, 0.0)) / span for k, v in cpu1.items()}
        threading.Thread(target=sample, daemon=True).start()
        return started

    jb.JobdProcess.start = sampled_start  # type: ignore[method-assign]
    with jb.scratch("jobd-waits-") as ctx:
        found["url"], found["armed"] = ctx.url, True
        extra = jb.FLOW_QUEUE if args.flow else None
        result = jb.e2e(ctx, args.jobs, kind=args.kind, keys=50 if args.flow else 0,
                        extra_queue=extra)
    print(json.dumps({"kind": args.kind, "flow": args.flow,
                      "jobs_per_s": round(result["jobs_per_s"])}))
    waits = found.get("waits", collections.Counter())
    total = sum(waits.values()) or 1
    print(f"{'share':>6}  {'waiting on':<22} statement")
    for (waiting, statement), n in waits.most_common(20):
        print(f"{n / total:6.1%}  {waiting:<22} {statement}")
    print("daemon threads, CPU share of the window:",
          {k: f"{v:.0%}" for k, v in found.get("threads", {}).items() if v > 0.005})


if __name__ == "__main__":
    main()
