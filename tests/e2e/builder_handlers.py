"""Handlers for tests/e2e/test_one_builder.py: one kind whose declaration sets every
default a job row takes (queue, priority, max_attempts, timeout, key and cost from the
args), and a parent that creates it as a workflow child and with `ctx.enqueue`."""

from __future__ import annotations

import msgspec

from actors import Child, Context, job


class Charge(msgspec.Struct):
    shop: str
    tokens: int = 1


@job("builder.charge", queue="builder", priority=3, max_attempts=7, timeout="90s",
     key=lambda a: f"shop:{a.shop}", cost=lambda a: a.tokens)
async def charge(ctx: Context, args: Charge) -> dict[str, int]:
    return {"tokens": args.tokens}


@job("builder.parent", queue="builder")
async def parent(ctx: Context, args: Charge) -> dict[str, int]:
    [spawned] = await ctx.spawn_many([Child(kind="builder.charge", args=args)], name="charge")
    enqueued = await ctx.enqueue("builder.charge", args)
    return {"spawned": spawned, "enqueued": enqueued.id}
