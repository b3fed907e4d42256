"""Handlers for test_tx_complete_limits: finish the job with tx.complete(result) after a
write in the same transaction, with a result the worker's checks must refuse."""

from __future__ import annotations

import msgspec

from actors import Context, job

WRITES_TABLE = "CREATE TABLE IF NOT EXISTS tx_writes (job_id bigint PRIMARY KEY)"


class Args(msgspec.Struct):
    what: str = "ok"


RESULTS = {
    "ok": {"fine": True},
    "nul": {"html": "<p>a\x00b</p>"},
    "surrogate": {"text": "lone \ud800 surrogate"},
    "big": {"blob": "z" * 10_000},
}


@job("tx_result", max_attempts=1)
async def tx_result(ctx: Context, args: Args) -> None:
    async with ctx.transaction() as tx:
        await tx.execute("INSERT INTO tx_writes (job_id) VALUES ($1)", ctx.job.id)
        await tx.complete(RESULTS[args.what])
