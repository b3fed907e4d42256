"""Handlers for tests/e2e/test_tracing_e2e.py: a job that fails once and then runs a step,
and one whose handler opens its own span with the ordinary OpenTelemetry API."""

from __future__ import annotations

import msgspec
import trio
from opentelemetry import trace

from actors import Context, job


class Empty(msgspec.Struct):
    pass


@job("traced.flaky", max_attempts=3, retry_delays={"unknown": 0.0})
async def flaky(ctx: Context, args: Empty) -> str:
    if ctx.job.attempt == 1:
        raise RuntimeError("the first attempt fails")
    return await ctx.step("finish", lambda: "done")


@job("traced.user", max_attempts=1)
async def user(ctx: Context, args: Empty) -> str:
    with trace.get_tracer("tests.handlers").start_as_current_span("user.span"):
        return "ok"


@job("traced.hangs_first", max_attempts=3)
async def hangs_first(ctx: Context, args: Empty) -> str:
    if ctx.job.attempt == 1:
        await trio.sleep(600)  # the daemon is killed meanwhile
    return "rescued"
