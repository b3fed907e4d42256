"""Handlers for the flow-control end-to-end tests (handlers.modules = tests.e2e.flow_handlers)."""

from __future__ import annotations

import os
import time

import msgspec
import trio

from actors import Context, RateLimited, RetryAfter, job

TABLE = """
CREATE TABLE IF NOT EXISTS flow_calls (
    job_id bigint, key text, pid int, started double precision, ended double precision)
"""


class CallArgs(msgspec.Struct):
    key: str
    hold_s: float = 0.1
    rate_limited: bool = False  # the first attempt gets a 429 that says 2 s
    unstated: bool = False  # the first attempt gets a 429 that says nothing
    snooze_s: float = 0.0  # the first run snoozes itself (RetryAfter)


@job("flow.call", queue="crawl", key=lambda a: a.key, max_attempts=10)
async def call(ctx: Context, args: CallArgs) -> None:
    if args.rate_limited and not ctx.job.errors:
        raise RateLimited(2.0, "429 from the marketplace")
    if args.unstated and not ctx.job.errors:
        raise RateLimited(reason="429 without Retry-After")
    if args.snooze_s and not ctx.job.errors:
        raise RetryAfter(args.snooze_s, "not yet")
    started = time.time()
    await trio.sleep(args.hold_s)
    async with ctx.transaction() as tx:
        await tx.execute(
            "INSERT INTO flow_calls VALUES ($1, $2, $3, $4, $5)",
            ctx.job.id, args.key, os.getpid(), started, time.time(),
        )
        await tx.complete(None)


class PlainArgs(msgspec.Struct):
    hold_s: float = 0.1


@job("flow.plain", queue="crawl", max_attempts=10)
async def plain(ctx: Context, args: PlainArgs) -> None:
    """A job without a key in the flow-controlled queue: it takes the keyless turn."""
    started = time.time()
    await trio.sleep(args.hold_s)
    async with ctx.transaction() as tx:
        await tx.execute("INSERT INTO flow_calls VALUES ($1, NULL, $2, $3, $4)",
                         ctx.job.id, os.getpid(), started, time.time())
        await tx.complete(None)
