"""The bench's jobd handlers (loaded next to examples.basic, which has `noop` and `sleep`).

`bench.lat` returns how long after its enqueuer's clock reading it started, so the
latency is measured the same way as for the peers: client clock -> handler start.
"""

from __future__ import annotations

import time

import msgspec

from actors import Context, job


class LatArgs(msgspec.Struct):
    t: float


@job("bench.lat", queue="default")
async def lat(ctx: Context, args: LatArgs) -> dict:
    return {"lat_ms": (time.time() - args.t) * 1000}


class StepsArgs(msgspec.Struct):
    steps: int = 0


# Just past the length jobd sleeps in place (actors.workflow.INLINE_SLEEP_S): every job
# really suspends, frees its slot and is claimed again when the sleep is over.
SUSPEND_S = 1.1


@job("bench.wf", queue="default")
async def wf(ctx: Context, args: StepsArgs) -> dict:
    """`steps` steps, then a durable sleep: the first run executes and stores the steps
    and suspends; the second replays them and returns what the replay cost: the first
    step (which loads every stored step in one round trip) and each later one."""
    started = loaded = time.perf_counter()
    for i in range(args.steps):
        await ctx.step(f"s{i}", int, i)
        if i == 0:
            loaded = time.perf_counter()
    done = time.perf_counter()
    await ctx.sleep("pause", SUSPEND_S)
    return {"load_ms": (loaded - started) * 1e3,
            "replay_us_per_step": (done - loaded) / max(1, args.steps - 1) * 1e6}


@job("bench.wf3", queue="default")
async def wf3(ctx: Context, args: StepsArgs) -> int:
    """Three memoized no-op steps: what a short pipeline costs over a no-op job."""
    total = 0
    for name in ("fetch", "transform", "store"):
        total += await ctx.step(name, int, 1)
    return total


class TickArgs(msgspec.Struct):
    n: int = 0
    user: str = ""


# Started by events (bench/events_bench.py): one job per `bench/tick`.
@job("bench.tick", queue="events", on_event="bench/tick", key="user",
     cancel_on=[{"event": "bench/untick", "match": "user"}])
async def tick(ctx: Context, args: TickArgs) -> None:
    return None
