"""Handlers for tests/e2e/test_containment.py: poison handlers, unstorable values,
loop blockers and sync (def) handlers. Loaded with
`handlers.modules = ["tests.e2e.containment_handlers"]`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

from actors import Context, job

# CREATE TABLE the tests run before a daemon starts.
RUNS_TABLE = ("CREATE TABLE runs (job_id bigint NOT NULL, attempt int NOT NULL,"
              " pid int NOT NULL, event text NOT NULL,"
              " at timestamptz NOT NULL DEFAULT clock_timestamp())")


class CrashArgs(msgspec.Struct):
    what: str


@job("poison", max_attempts=1)
async def poison(ctx: Context, args: CrashArgs) -> None:
    """Raises what a handler never should; the daemon must go on."""
    if args.what == "group":
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise KeyboardInterrupt("inside a nursery")
    raise {"KeyboardInterrupt": KeyboardInterrupt, "SystemExit": SystemExit,
           "BaseException": BaseException}[args.what](f"poison {args.what}")


@job("poison_sync", max_attempts=1)
def poison_sync(ctx: Context, args: CrashArgs) -> None:
    raise SystemExit(f"poison {args.what} from a thread")


class ValueArgs(msgspec.Struct):
    what: str


@job("unstorable", max_attempts=1)
async def unstorable(ctx: Context, args: ValueArgs) -> Any:
    """Values Postgres cannot store, in every place a handler can put one."""
    if args.what == "nul_result":
        return {"html": "<p>scraped\x00page</p>"}
    if args.what == "surrogate_result":
        return {"text": "half a pair: \ud83d"}
    if args.what == "recursive_result":
        loop: dict[str, Any] = {}
        loop["self"] = loop
        return loop
    if args.what == "big_result":
        return {"blob": "x" * 8000}
    if args.what == "nul_error":
        raise RuntimeError("bad row: a\x00b \udc80")
    if args.what == "nul_progress":
        ctx.progress(50, "note with \x00 and \ud800")
        await trio.sleep(1.0)  # let the progress batch (0.25 s) reach the database
        return "noted"
    if args.what == "bad_progress":
        try:
            ctx.progress(10, {"not": "a string"})  # type: ignore[arg-type]
        except TypeError as exc:
            return {"caught": str(exc)}
        return {"caught": None}
    return "fine"


@job("plain")
async def plain(ctx: Context, args: dict) -> str:
    return "ok"


class RunArgs(msgspec.Struct):
    hold_s: float = 0.0
    block_s: float = 0.0  # time.sleep on the loop, first attempt only


@job("logged", max_attempts=3)
async def logged(ctx: Context, args: RunArgs) -> str:
    """Logs the start and end of every run (committed on their own) to `runs`."""
    await ctx.execute("INSERT INTO runs (job_id, attempt, pid, event) VALUES ($1, $2, $3, 'start')",
                      ctx.job.id, ctx.job.attempt, os.getpid())
    try:
        if args.block_s and ctx.job.attempt == 1:
            time.sleep(args.block_s)  # noqa: ASYNC251 - the point: a loop blocker
        await trio.sleep(args.hold_s)
    finally:
        with trio.CancelScope(shield=True):
            await ctx.execute(
                "INSERT INTO runs (job_id, attempt, pid, event) VALUES ($1, $2, $3, 'end')",
                ctx.job.id, ctx.job.attempt, os.getpid())
    return "done"


class BlockArgs(msgspec.Struct):
    seconds: float


@job("loop_blocker", max_attempts=1)
async def loop_blocker(ctx: Context, args: BlockArgs) -> str:
    time.sleep(args.seconds)  # noqa: ASYNC251 - the point
    return "blocked"


class WaitFileArgs(msgspec.Struct):
    path: str


@job("sync_wait", max_attempts=1)
def sync_wait(ctx: Context, args: WaitFileArgs) -> dict:
    """A plain def: blocks its thread until the file exists (a blocking SDK call)."""
    ctx.progress(10, "waiting in a thread")
    path = Path(args.path)
    while not path.exists():
        time.sleep(0.02)
    ctx.progress(90, "file seen")
    # The async ctx methods are reached through trio.from_thread.run.
    one = trio.from_thread.run(ctx.fetch, "SELECT 1 AS one")
    return {"read": path.read_text(), "one": one[0]["one"]}


class SleepArgs(msgspec.Struct):
    seconds: float


@job("sync_sleep", max_attempts=1, timeout=0.5)
def sync_sleep(ctx: Context, args: SleepArgs) -> str:
    time.sleep(args.seconds)
    return "slept"


@job("hang", max_attempts=1, queue="hangs")
async def hang(ctx: Context, args: dict) -> None:
    await trio.sleep_forever()


@job("hang_default", max_attempts=1)
async def hang_default(ctx: Context, args: dict) -> None:
    await trio.sleep_forever()
