"""CPU per `GroupCommit.submit` on trio, without a database: 200 tasks submitting 300
rows each to a write that only checkpoints (where the real one crosses to asyncpg), so
what is measured is the group commit's own waiting and waking.

    .venv/bin/python bench/group_commit_bench.py [--tasks 200] [--rounds 300] [--reps 3]

Another tree's: `PYTHONPATH=<checkout> .venv/bin/python bench/group_commit_bench.py`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# Appended, not inserted: a PYTHONPATH checkout comes first.
sys.path.append(str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from actors.services.group_commit import GroupCommit  # noqa: E402


async def write(rows: list[int]) -> list[int]:
    await trio.lowlevel.checkpoint()
    return rows


async def one(tasks: int, rounds: int) -> tuple[float, int]:
    commit: GroupCommit[int, int] = GroupCommit(write, what="bench")

    async def producer() -> None:
        for i in range(rounds):
            await commit.submit(i)

    started = time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(producer)
    return (time.process_time() - started) / (tasks * rounds) * 1e6, commit.writes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    runs = [trio.run(one, args.tasks, args.rounds) for _ in range(args.reps)]
    cpu = [us for us, _ in runs]
    print(f"GroupCommit.submit: {statistics.median(cpu):.2f} us CPU per submit (median; "
          f"{min(cpu):.2f}-{max(cpu):.2f}), {runs[0][1]} writes for "
          f"{args.tasks * args.rounds} rows")


if __name__ == "__main__":
    main()
