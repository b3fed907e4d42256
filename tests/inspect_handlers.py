"""Handlers for tests/test_inspect_activity.py: a workflow with steps, children, a
durable sleep and an event wait, started by an event; and a job that fails."""

from __future__ import annotations

import msgspec

from actors import Context, Fail, job
from actors.workflow import Child


class FlowArgs(msgspec.Struct):
    n: int
    big: bool = False


@job("ia.flow", queue="ia", on_event="ia/start", max_attempts=5, timeout="10m")
async def flow(ctx: Context, args: FlowArgs) -> dict:
    # Over limits.list_field_bytes when big: inspect leaves it out and names it.
    prep = await ctx.step("prep", lambda: "x" * (10_000 if args.big else 10))
    ids = await ctx.spawn_many([Child(kind="ia.child", args={"i": i}) for i in range(2)],
                               name="kids")
    kids = await ctx.gather(ids, name="kids")
    await ctx.sleep("nap", 0.2)
    approval = await ctx.wait_for_event("ia/approve", match={"n": args.n}, timeout="1h")
    return {"prep": len(prep), "kids": [k.result for k in kids], "approval": approval}


class ChildArgs(msgspec.Struct):
    i: int


@job("ia.child", queue="ia")
async def child(ctx: Context, args: ChildArgs) -> int:
    return await ctx.step("work", lambda: args.i * 10)


class BoomArgs(msgspec.Struct):
    message: str


@job("ia.boom", queue="ia", max_attempts=1)
async def boom(ctx: Context, args: BoomArgs) -> None:
    raise RuntimeError(args.message)  # ia-boom-marker: only in the traceback


@job("ia.fatal", queue="ia", max_attempts=1)
async def fatal(ctx: Context, args: BoomArgs) -> None:
    raise Fail(args.message)
