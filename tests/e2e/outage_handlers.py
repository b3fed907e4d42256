"""Handlers for the database-outage tests (tests/e2e/test_db_outage.py).

Their side effect is a line appended to a file (JOBD_TEST_EFFECTS), not a row: it has to
happen while Postgres is away, and the test counts how often each job ran.
"""

from __future__ import annotations

import os

import msgspec
import trio

from actors import Context, job


class FileEffectArgs(msgspec.Struct):
    hold_s: float = 0.0  # on the first attempt only
    started: bool = False  # also note the start (a line "start <id> <attempt>")


def _note(line: str) -> None:
    with open(os.environ["JOBD_TEST_EFFECTS"], "a") as f:
        f.write(line + "\n")


@job("file_effect", queue="outage", max_attempts=25)
async def file_effect(ctx: Context, args: FileEffectArgs) -> dict:
    if args.started:
        _note(f"start {ctx.job.id} {ctx.job.attempt}")
    if args.hold_s and ctx.job.attempt == 1:
        await trio.sleep(args.hold_s)
    _note(f"done {ctx.job.id} {ctx.job.attempt}")
    return {"ok": True}
