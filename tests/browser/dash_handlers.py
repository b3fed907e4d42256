"""Handlers for the dashboard's browser tests (tests/browser/test_dashboard.py).

Kinds that succeed, fail with a traceback, report progress slowly, and a workflow with
steps and a child that fails its first attempt only. Slow parts wait on a gate file the
test creates, never on a fixed time, so a test sees the state it waits for.
"""

from __future__ import annotations

import os

import msgspec
import trio

from actors import Context, job
from actors.workflow import Child


async def _wait_for(path: str) -> None:
    # A file the test process creates: nothing in this process could set an Event.
    while True:
        if os.path.exists(path):
            return
        await trio.sleep(0.05)


class OkArgs(msgspec.Struct):
    n: int = 0


@job("dash.ok", queue="dash")
async def ok(ctx: Context, args: OkArgs) -> dict:
    return {"n": args.n, "doubled": 2 * args.n}


class BoomArgs(msgspec.Struct):
    what: str = "disk"


def _explode(what: str) -> None:
    raise ValueError(f"{what} on fire")


@job("dash.boom", queue="dash", max_attempts=1)
async def boom(ctx: Context, args: BoomArgs) -> None:
    _explode(args.what)  # one frame more, so the traceback names a helper


class SlowArgs(msgspec.Struct):
    steps: int = 600
    step_s: float = 0.2


@job("dash.slow", queue="slow", timeout="1h")
async def slow(ctx: Context, args: SlowArgs) -> dict:
    for i in range(args.steps):
        ctx.progress(100 * (i + 1) / args.steps, f"chunk {i + 1} of {args.steps}")
        await trio.sleep(args.step_s)
    return {"chunks": args.steps}


class LaterArgs(msgspec.Struct):
    n: int = 0


@job("dash.later", queue="later")
async def later(ctx: Context, args: LaterArgs) -> None:
    """Seeded with a day's delay: the bulk-cancel test's targets."""


class KeyedArgs(msgspec.Struct):
    gate: str


@job("dash.keyed", queue="keyed", timeout="1h")
async def keyed(ctx: Context, args: KeyedArgs) -> None:
    """Holds its key's one slot until the gate opens: the key stays listed, one running
    and the rest waiting."""
    await _wait_for(args.gate)


class LeafArgs(msgspec.Struct):
    i: int


@job("dash.leaf", queue="flow")
async def leaf(ctx: Context, args: LeafArgs) -> int:
    return args.i * 10


class FlowArgs(msgspec.Struct):
    seed: int
    gate: str  # the second attempt waits until this file exists


@job("dash.flow", queue="flow", max_attempts=1, timeout="10m")
async def flow(ctx: Context, args: FlowArgs) -> dict:
    """fetch, a child, then publish, which fails on the first attempt only."""
    fetched = await ctx.step("fetch", lambda: args.seed * 2)
    ids = await ctx.spawn_many([Child(kind="dash.leaf", args={"i": args.seed})], name="kids")
    kids = await ctx.gather(ids, name="kids")

    async def publish() -> str:
        if ctx.job.attempt == 1:
            raise ConnectionError(f"upstream refused seed {args.seed}")
        await _wait_for(args.gate)
        return "published"

    status = await ctx.step("publish", publish, retries=0)
    return {"fetched": fetched, "children": [k.result for k in kids], "status": status}
