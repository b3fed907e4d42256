"""Handlers for the flow-control tools end-to-end tests
(handlers.modules = tests.e2e.flow_tools_handlers)."""

from __future__ import annotations

import os

import msgspec
import trio

from actors import Context, job
from protocol.jobs import JobSpec

TABLE = """
CREATE TABLE IF NOT EXISTS tool_runs (job_id bigint, kind text, key text, n int, pid int);
CREATE TABLE IF NOT EXISTS tool_items (job_id bigint, day text, i int, pid int);
"""


class Capture(msgspec.Struct):
    market: str
    n: int = 0


class Item(msgspec.Struct):
    day: str
    i: int
    hold_s: float = 0.0


class Account(msgspec.Struct):
    acct: str
    n: int = 0
    hold_s: float = 0.0


async def record(ctx: Context, kind: str, key: str, n: int) -> None:
    async with ctx.transaction() as tx:
        await tx.execute("INSERT INTO tool_runs VALUES ($1, $2, $3, $4, $5)",
                         ctx.job.id, kind, key, n, os.getpid())
        await tx.complete({"n": n})


@job("tools.capture", debounce="2s", debounce_key="market", debounce_max="60s")
async def capture(ctx: Context, args: Capture) -> None:
    await record(ctx, "capture", args.market, args.n)


@job("tools.daily", batch_size=5, batch_timeout="1s", batch_key="day", max_attempts=10)
async def daily(ctx: Context, args: list[Item]) -> None:
    await trio.sleep(max((a.hold_s for a in args), default=0.0))
    # The items and the completion commit together: a batch whose daemon is killed
    # records nothing and runs again whole.
    async with ctx.transaction() as tx:
        for a in args:
            await tx.execute("INSERT INTO tool_items VALUES ($1, $2, $3, $4)",
                             ctx.job.id, a.day, a.i, os.getpid())
        await tx.complete({"items": len(args)})


@job("tools.ping", throttle="1/m", throttle_key="acct", throttle_burst=2, mode="drop")
async def ping(ctx: Context, args: Account) -> None:
    await record(ctx, "ping", args.acct, args.n)


@job("tools.sync", singleton_key="acct", mode="skip")
async def sync(ctx: Context, args: Account) -> None:
    await trio.sleep(args.hold_s)
    await record(ctx, "sync", args.acct, args.n)


@job("tools.resync", singleton_key="acct", mode="cancel", max_attempts=1)
async def resync(ctx: Context, args: Account) -> None:
    await trio.sleep(args.hold_s)
    await record(ctx, "resync", args.acct, args.n)


@job("tools.replace", unique_mode="replace")
async def replace(ctx: Context, args: Account) -> None:
    await record(ctx, "replace", args.acct, args.n)


@job("tools.on_change", on_event="market/changed", debounce="2s", debounce_key="market")
async def on_change(ctx: Context, args: Capture) -> None:
    await record(ctx, "on_change", args.market, args.n)


@job("tools.on_signup", on_event="user/signup", batch_size=4, batch_timeout="1s",
     batch_key="day")
async def on_signup(ctx: Context, args: list[Item]) -> None:
    async with ctx.transaction() as tx:
        for a in args:
            await tx.execute("INSERT INTO tool_items VALUES ($1, $2, $3, $4)",
                             ctx.job.id, a.day, a.i, os.getpid())
        await tx.complete({"items": len(args)})


class Fanout(msgspec.Struct):
    day: str
    n: int


@job("tools.fanout")
async def fanout(ctx: Context, args: Fanout) -> None:
    # Children into a batch kind: each enqueue is one item of the day's batches.
    await ctx.enqueue_batch([JobSpec(kind="tools.daily", args={"day": args.day, "i": i})
                             for i in range(args.n)])
