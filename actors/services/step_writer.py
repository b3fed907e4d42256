"""The step writer: the StepStore running workflows use, whose `save_step` is a group
commit across every workflow of this daemon.

A three-step workflow stored each step in its own statement and commit (a round trip
and ~0.3-0.6 ms of daemon CPU each): three times a no-op job's share of the completer's
batched finish. Here the steps finished while a write is in flight go together in the
next one (store.save_steps, one INSERT for all of them), an idle daemon writes at once,
and each `await ctx.step(...)` returns once the statement holding its row has committed
(actors/services/group_commit.py). Per row: its stored result (the first completion's),
LeaseLost if its attempt no longer holds the job, or the error of a value Postgres
refuses (that batch is written again row by row, so only the bad row's step fails).

Everything else a workflow asks the store (loads, spawns, waits) goes straight through.
"""

from __future__ import annotations

from typing import Any

from actors.ports import LeaseLost, NewJob, StepRow, Store
from actors.services.group_commit import GroupCommit

MAX_ROWS = 500
MAX_BYTES = 4 << 20  # a statement's results; one larger result goes alone


class StepWriter:
    def __init__(self, store: Store, *, max_rows: int = MAX_ROWS, max_bytes: int = MAX_BYTES):
        self._store = store
        self.commit: GroupCommit[StepRow, str] = GroupCommit(
            self._write, what="step", max_rows=max_rows,
            size=lambda r: len(r.result) + len(r.name), max_bytes=max_bytes)

    async def save_step(self, job_id: int, token: int, name: str, result: str, attempts: int,
                        duration_s: float) -> str:
        return await self.commit.submit(StepRow(job_id, token, name, result, attempts,
                                                duration_s))

    async def _write(self, rows: list[StepRow]) -> list[str | Exception]:
        stored = await self._store.save_steps(rows)
        return [s if s is not None else LeaseLost(
                    f"job {r.job_id}: this attempt no longer holds the lease; "
                    f"step {r.name!r} not stored")
                for r, s in zip(rows, stored, strict=True)]

    # -- the rest goes straight to the store ----------------------------------------------

    async def load_steps(self, job_id: int) -> list[tuple[str, str | None, bool]]:
        return await self._store.load_steps(job_id)

    async def save_step_error(self, job_id: int, name: str, error: str, attempts: int) -> None:
        await self._store.save_step_error(job_id, name, error, attempts)

    async def begin_sleep(self, job_id: int, name: str, until: float) -> float:
        return await self._store.begin_sleep(job_id, name, until)

    async def spawn_children(self, job_id: int, name: str, jobs: list[NewJob]) -> list[int]:
        return await self._store.spawn_children(job_id, name, jobs)

    async def gather_children(self, job_id: int, token: int, waiting_on: str,
                              ids: list[int]) -> list[dict[str, Any]]:
        return await self._store.gather_children(job_id, token, waiting_on, ids)

    async def begin_wait(self, job_id: int, token: int, step: str, event: str, match: str,
                         timeout_s: float | None) -> tuple[str, str | None, float]:
        return await self._store.begin_wait(job_id, token, step, event, match, timeout_s)

    async def get_job(self, job_id: int) -> dict[str, Any] | None:
        return await self._store.get_job(job_id)
