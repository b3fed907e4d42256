"""Handlers for tests/e2e/test_retention_e2e.py: a fan-in parent that holds between its
spawn and its gather until the test lets it go (a file appears)."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import trio

from actors import Context, job
from actors.workflow import Child


class Empty(msgspec.Struct):
    pass


class ChildArgs(msgspec.Struct):
    n: int


@job("fanin.child")
async def child(ctx: Context, args: ChildArgs) -> dict:
    return {"n": args.n}


@job("fanin.parent", max_attempts=1, timeout="5m")
async def parent(ctx: Context, args: Empty) -> dict:
    ids = await ctx.spawn_many([Child(kind="fanin.child", args={"n": n}) for n in (1, 2, 3)],
                               name="kids")
    go = Path(os.environ["FANIN_GO_FILE"])
    with trio.fail_after(120):
        while not go.exists():  # noqa: ASYNC110 - a file the test writes
            await trio.sleep(0.02)
    results = await ctx.gather(ids, name="kids")
    return {"sum": sum(r.result["n"] for r in results)}
