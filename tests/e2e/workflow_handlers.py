"""Workflow handlers for tests/e2e/test_workflow_crash.py.

Every step execution is logged in `step_runs` (its own transaction, before the step's
result is stored), so a test can count how often each step really ran.
"""

from __future__ import annotations

import os
import time

import msgspec
import trio

from actors import Context, Fail, job
from actors.workflow import Child

TABLES = {
    "step_runs": "CREATE TABLE step_runs (job_id bigint NOT NULL, step text NOT NULL,"
                 " pid int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "refunds": "CREATE TABLE refunds (job_id bigint PRIMARY KEY, credits int NOT NULL)",
    "gate": "CREATE TABLE gate (open boolean NOT NULL)",
}


async def _log(ctx: Context, step: str) -> None:
    await ctx.execute("INSERT INTO step_runs (job_id, step, pid) VALUES ($1, $2, $3)",
                      ctx.job.id, step, os.getpid())


class PipelineArgs(msgspec.Struct):
    seed: int
    steps: int = 5
    hold_s: float = 0.3
    sleep_s: float = 0.0
    children: int = 0
    child_hold_s: float = 0.5
    event: str | None = None


@job("wf.pipeline", queue="wf", max_attempts=20, timeout="10m")
async def pipeline(ctx: Context, args: PipelineArgs) -> dict:
    async def work(i: int) -> int:
        await _log(ctx, f"s{i}")
        await trio.sleep(args.hold_s)
        return args.seed * 100 + i * i

    values = [await ctx.step(f"s{i}", work, i) for i in range(args.steps)]
    late = None
    if args.sleep_s:
        until = await ctx.step("sleep_target", lambda: time.time() + args.sleep_s)
        await ctx.sleep("nap", args.sleep_s)
        woke = await ctx.step("woke", time.time)
        late = woke - until
    kids: list = []
    if args.children:
        ids = await ctx.spawn_many(
            [Child(kind="wf.child", args={"seed": args.seed, "i": i, "hold_s": args.child_hold_s})
             for i in range(args.children)], name="kids")
        results = await ctx.gather(ids, name="kids")
        kids = [r.result if r.ok else r.state for r in results]
    approval = None
    if args.event:
        approval = await ctx.wait_for_event(args.event, match={"seed": args.seed},
                                            timeout="1h")
    return {"values": values, "children": kids, "late_s": late, "approval": approval}


class ChildArgs(msgspec.Struct):
    seed: int
    i: int
    hold_s: float = 0.5
    fail: bool = False


@job("wf.child", queue="wf", max_attempts=20)
async def child(ctx: Context, args: ChildArgs) -> int:
    async def work() -> int:
        await _log(ctx, "work")
        await trio.sleep(args.hold_s)
        if args.fail:
            raise Fail("asked to fail")
        return args.seed * 1000 + args.i * 10

    return await ctx.step("work", work)


class ChargeArgs(msgspec.Struct):
    credits: int


async def refund(ctx: Context, args: ChargeArgs, error: dict | None) -> None:
    async def give_back() -> int:
        await ctx.execute("INSERT INTO refunds (job_id, credits) VALUES ($1, $2)",
                          ctx.job.id, args.credits)
        return args.credits

    await ctx.step("refund", give_back)


@job("wf.doomed", queue="wf", max_attempts=2, retry_delays={"unknown": 0.05}, on_failure=refund)
async def doomed(ctx: Context, args: ChargeArgs) -> None:
    await ctx.step("charge", lambda: args.credits)
    raise RuntimeError("the model is down")


def expected(args: PipelineArgs) -> dict:
    return {"values": [args.seed * 100 + i * i for i in range(args.steps)],
            "children": [args.seed * 1000 + i * 10 for i in range(args.children)]}


class GatedArgs(msgspec.Struct):
    seed: int
    sleep_s: float = 2.0


@job("wf.gated", queue="wf", max_attempts=20)
async def gated(ctx: Context, args: GatedArgs) -> dict:
    """A step, then (once the test opens the gate) a durable sleep, then a step: the test
    kills the daemon while the sleep's record waits in the completer."""
    async def before() -> int:
        await _log(ctx, "before")
        return args.seed

    async def after() -> int:
        await _log(ctx, "after")
        return args.seed * 2

    first = await ctx.step("before", before)
    while not await ctx.fetch("SELECT 1 FROM gate WHERE open"):  # noqa: ASYNC110 - a table
        await trio.sleep(0.05)
    await _log(ctx, "suspending")
    await ctx.sleep("nap", args.sleep_s)
    return {"before": first, "after": await ctx.step("after", after)}


class AckedArgs(msgspec.Struct):
    acks: str  # a file: a line per step whose await returned, written just after
    steps: int = 20
    pause_s: float = 0.0  # between steps: keeps the workflows writing for a while


# A step whose write met an outage fails the attempt (an "unknown" error): retried soon.
@job("wf.acked", queue="wf", max_attempts=20, retry_delays={"unknown": 0.2})
async def acked(ctx: Context, args: AckedArgs) -> int:
    """Many one-line steps; each one's return acknowledged in a file (outside the daemon's
    database writes, and kept by the OS when the daemon is SIGKILLed)."""
    fd = os.open(args.acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for i in range(args.steps):
            await ctx.step(f"s{i}", lambda i=i: i * i)
            os.write(fd, f"{ctx.job.id} s{i}\n".encode())
            if args.pause_s:
                await trio.sleep(args.pause_s)
    finally:
        os.close(fd)
    return args.steps


class UnstorableArgs(msgspec.Struct):
    what: str = "nul"  # "nul": a NUL byte (jsonb has none); "big": a 2 MB string


@job("wf.unstorable", queue="wf", max_attempts=1)
async def unstorable(ctx: Context, args: UnstorableArgs) -> str:
    """A step whose result Postgres refuses or that is merely big, written in the same
    statements as other workflows' steps."""
    await ctx.step("fine", lambda: 1)
    value = "a\x00b" if args.what == "nul" else "x" * (2 << 20)
    stored = await ctx.step("bad", lambda: value)
    return f"{len(stored)} chars"
