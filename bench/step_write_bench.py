"""What one step write costs Postgres: `SAVE_STEPS` (the step writer's statement, the
steps of many running workflows in one INSERT) for 10 and 200 running jobs, three steps
each, on a throwaway embedded cluster. Prints the round trip with its commit (median,
through asyncpg's prepared statement, so with the plan Postgres settles on for it), and
for 200 rows the generic plan's EXPLAIN ANALYZE: execution time, the index it reads
jobs by, and the time in constraint triggers.

    .venv/bin/python bench/step_write_bench.py [--rounds 60] [--plan]

`--plan` prints the whole generic plan. Another tree's (its migrations and statement):
`PYTHONPATH=<checkout> .venv/bin/python bench/step_write_bench.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import re
import statistics
import sys
import time
from pathlib import Path

# Appended, not inserted: a PYTHONPATH checkout comes first.
ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))

import asyncpg  # noqa: E402

from bench import jobd_bench as jb  # noqa: E402
from daemon.store.sql import workflows as wq  # noqa: E402

try:
    from tests.support import generic_plan  # noqa: E402
except ImportError:  # a PYTHONPATH checkout from before the helper: this tree's
    _spec = importlib.util.spec_from_file_location("_support", ROOT / "tests" / "support.py")
    assert _spec is not None and _spec.loader is not None
    _support = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_support)
    generic_plan = _support.generic_plan

RUNNING = ("INSERT INTO jobd.jobs (queue, kind, args, state, lease_token)"
           " SELECT 'q', 'wf', '{}', 'running', 1 FROM generate_series(1, $1) RETURNING id")
TYPES = "bigint[], bigint[], text[], text[], int[], float8[]"


def args_for(ids: list[int], step: int) -> tuple:
    n = len(ids)
    return (ids, [1] * n, [f"s{step}"] * n, ['{"a": 1}'] * n, [1] * n, [0.001] * n)


async def measure(url: str, rounds: int, whole_plan: bool) -> None:
    conn = await asyncpg.connect(url)
    try:
        for n in (10, 200):
            times = []
            for _ in range(rounds):
                await conn.execute("DELETE FROM jobd.jobs")
                ids = [r["id"] for r in await conn.fetch(RUNNING, n)]
                for step in range(3):
                    started = time.perf_counter()
                    await conn.fetch(wq.SAVE_STEPS, *args_for(ids, step))
                    times.append(time.perf_counter() - started)
            print(f"{n:4d} rows: {statistics.median(times) * 1000:.3f} ms per statement with "
                  f"its commit (median of {len(times)})")
        await conn.execute("DELETE FROM jobd.jobs")
        ids = [r["id"] for r in await conn.fetch(RUNNING, 200)]
        plan = await generic_plan(conn, wq.SAVE_STEPS, TYPES, *args_for(ids, 0),
                                  analyze=True)
        if whole_plan:
            print("\n".join(plan))
        jobs_by = sorted({m.group(1) or m.group(2) or "a sequential scan" for line in plan
                          if (m := re.search(r"Scan using (\w+) on jobs\b|Bitmap Index Scan "
                                             r"on (jobs\w*)|Seq Scan on jobs\b", line))})
        removed = sum(int(m.group(1)) for line in plan
                      if (m := re.search(r"Rows Removed by (?:Join )?Filter: (\d+)", line)))
        keep = [line.strip() for line in plan if re.match(r"\s*(Trigger|Execution Time)", line)]
        print(f"generic plan, 200 rows: jobs read by {', '.join(jobs_by) or '-'}, "
              f"{removed} rows removed by filters; " + "; ".join(keep))
    finally:
        await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--plan", action="store_true", help="print the whole generic plan")
    args = ap.parse_args()
    with jb.scratch("jobd-steps-") as ctx:
        asyncio.run(measure(ctx.url, args.rounds, args.plan))


if __name__ == "__main__":
    main()
