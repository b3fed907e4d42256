"""Small handlers used by the README walkthrough and the test suite.

Load them with `handlers.modules = ["examples.basic"]` (run jobd from the repository
root, or set `handlers.paths`).
"""

from __future__ import annotations

import msgspec
import trio

from actors import Context, Fail, job


class Empty(msgspec.Struct):
    pass


@job("noop", queue="default")
async def noop(ctx: Context, args: Empty) -> None:
    return None


class SleepArgs(msgspec.Struct):
    seconds: float = 1.0
    steps: int = 10


@job("sleep", queue="default", timeout="1h")
async def sleep(ctx: Context, args: SleepArgs) -> dict:
    """Sleeps in steps, reporting progress after each one."""
    for step in range(args.steps):
        await trio.sleep(args.seconds / args.steps)
        ctx.progress(100 * (step + 1) / args.steps, f"step {step + 1}/{args.steps}")
    return {"slept": args.seconds}


class FlakyArgs(msgspec.Struct):
    failures: int = 2
    fatal: bool = False


@job("flaky", queue="default", max_attempts=5, retry_delays={"unknown": 0.05})
async def flaky(ctx: Context, args: FlakyArgs) -> dict:
    """Fails its first `failures` attempts, then succeeds (or fails for good if fatal)."""
    if args.fatal:
        raise Fail("told to fail")
    if ctx.job.attempt <= args.failures:
        raise RuntimeError(f"planned failure {ctx.job.attempt}/{args.failures}")
    return {"attempts": ctx.job.attempt}


class EffectArgs(msgspec.Struct):
    name: str
    hold_s: float = 0.0


@job("effect", queue="effects", max_attempts=25)
async def effect(ctx: Context, args: EffectArgs) -> dict:
    """Records a side effect in the application's own table, in the job's transaction."""
    if args.hold_s:
        await trio.sleep(args.hold_s)
    async with ctx.transaction() as tx:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS effects ("
            " job_id bigint, name text, attempt int, at timestamptz DEFAULT now())"
        )
        await tx.execute(
            "INSERT INTO effects (job_id, name, attempt) VALUES ($1, $2, $3)",
            ctx.job.id, args.name, ctx.job.attempt,
        )
        await tx.complete({"recorded": args.name})
    return {"recorded": args.name}
