"""Handlers for the crash-safety tests (tests/e2e/test_crash.py, test_two_daemons.py).

Loaded by the daemon under test with `handlers.modules = ["tests.e2e.crash_handlers"]`
(the repository root is on PYTHONPATH; `tests` is a namespace package). The tables they
write are created by the tests before any daemon starts, so handlers never race on DDL.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
import trio

from actors import Context, job
from daemon.store import LeaseLost

# CREATE TABLE statements the tests run up front (one per handler table).
TABLES = {
    "plain_effects": "CREATE TABLE plain_effects ("
                     " job_id bigint NOT NULL, name text, attempt int NOT NULL,"
                     " at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "attempt_log": "CREATE TABLE attempt_log ("
                   " job_id bigint NOT NULL, attempt int NOT NULL, token int NOT NULL,"
                   " pid int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "nap_log": "CREATE TABLE nap_log ("
               " job_id bigint NOT NULL, attempt int NOT NULL, pid int NOT NULL,"
               " event text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "nap_release": "CREATE TABLE nap_release (job_id bigint NOT NULL, attempt int NOT NULL)",
}


class PlainEffectArgs(msgspec.Struct):
    name: str
    hold_s: float = 0.0


@job("plain_effect", queue="effects", max_attempts=25)
async def plain_effect(ctx: Context, args: PlainEffectArgs) -> dict:
    """The side effect commits on its own; the job completes later through the completer.

    Between the two commits a crash leaves an effect whose job is still `running`, so the
    rescued job runs (and records) again: at-least-once, by design.
    """
    if args.hold_s:
        await trio.sleep(args.hold_s)
    await ctx.execute(
        "INSERT INTO plain_effects (job_id, name, attempt) VALUES ($1, $2, $3)",
        ctx.job.id, args.name, ctx.job.attempt,
    )
    return {"recorded": args.name}


class RecordArgs(msgspec.Struct):
    hold_s: float = 0.0


@job("record_attempt", queue="shared", max_attempts=25)
async def record_attempt(ctx: Context, args: RecordArgs) -> dict:
    """Logs (job, attempt, lease token, daemon pid), then completes the job.

    The log row commits on its own, before the job completes: a second run of the same
    attempt would leave a second row even though its completion would be fenced (and
    would roll back anything written in the completing transaction).
    """
    pid = os.getpid()
    if args.hold_s:
        await trio.sleep(args.hold_s)
    await ctx.execute(
        "INSERT INTO attempt_log (job_id, attempt, token, pid) VALUES ($1, $2, $3, $4)",
        ctx.job.id, ctx.job.attempt, ctx._token, pid,
    )
    result = {"pid": pid, "attempt": ctx.job.attempt}
    async with ctx.transaction() as tx:
        await tx.complete(result)
    return result


class NapArgs(msgspec.Struct):
    finish: str = "return"  # "return": through the completer; "tx": tx.complete


@job("nap", queue="naps", max_attempts=5, timeout="1h")
async def nap(ctx: Context, args: NapArgs) -> dict:
    """Blocks until the test inserts (job_id, attempt) into nap_release, then finishes.

    Every step is logged in nap_log (in its own transaction) so the test can tell what a
    paused-and-resumed attempt did after its lease was taken away.
    """
    job_id, attempt, pid = ctx.job.id, ctx.job.attempt, os.getpid()

    async def note(event: str) -> None:
        await ctx.execute(
            "INSERT INTO nap_log (job_id, attempt, pid, event) VALUES ($1, $2, $3, $4)",
            job_id, attempt, pid, event,
        )

    await note("started")
    try:
        return await _nap_then_finish(ctx, args, note)
    except trio.Cancelled:  # e.g. its daemon found the lease gone and stopped it
        with trio.CancelScope(shield=True):
            await note("stopped")
        raise


async def _nap_then_finish(ctx: Context, args: NapArgs, note: Any) -> dict:
    job_id, attempt, pid = ctx.job.id, ctx.job.attempt, os.getpid()
    while not await ctx.fetch(
        "SELECT 1 FROM nap_release WHERE job_id = $1 AND attempt = $2", job_id, attempt
    ):
        ctx.progress(50.0, f"napping (attempt {attempt})")
        await trio.sleep(0.05)
    result = {"pid": pid, "attempt": attempt}
    if args.finish == "tx":
        try:
            async with ctx.transaction() as tx:
                await tx.complete(result)
        except LeaseLost:
            await note("fenced")
            raise
        await note("completed_in_tx")
        return result
    await note("returned")
    return result
