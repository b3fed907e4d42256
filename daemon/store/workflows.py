"""PgStore's workflow statements (sql/workflows.py): what actors.workflow.StepStore needs,
events, the reaper's wake-up safety net, and `jobctl get`'s workflow details."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from actors.ports import LeaseLost, NewJob, StepRow
from daemon.store.base import StoreBase
from daemon.store.sql import workflows as wq
from daemon.store.sql.common import job_rows_json


class WorkflowStatements(StoreBase):
    async def load_steps(self, job_id: int) -> list[tuple[str, str | None, bool]]:
        rows = await self._fetch(wq.LOAD_STEPS, job_id, op="steps")
        return [(r["name"], r["result"], r["done"]) for r in rows]

    async def save_step(self, job_id: int, token: int, name: str, result: str, attempts: int,
                        duration_s: float) -> str:
        """One step on its own (a running workflow's go through actors/services/step_writer.py,
        many in one statement). LeaseLost: this attempt no longer holds the job."""
        [stored] = await self.save_steps([StepRow(job_id, token, name, result, attempts,
                                                  duration_s)])
        if stored is None:
            raise LeaseLost(f"job {job_id}: this attempt no longer holds the lease; "
                            f"step {name!r} not stored")
        return stored

    async def save_steps(self, rows: list[StepRow]) -> list[str | None]:
        """Each row's stored result (the first completion's), in order; None where the
        row's attempt no longer holds the lease (nothing stored). One statement; a value
        Postgres refuses (a NUL byte, a result over its limits) fails all of it
        (ValueRejected): the caller writes the rows apart to find whose it was."""
        records = await self._fetch(
            wq.SAVE_STEPS, [r.job_id for r in rows], [r.token for r in rows],
            [r.name for r in rows], [r.result for r in rows], [r.attempts for r in rows],
            [r.duration_s for r in rows], op="step")
        return [r["result"] if r["live"] else None for r in records]

    async def save_step_error(self, job_id: int, name: str, error: str, attempts: int) -> None:
        await self._execute(wq.SAVE_STEP_ERROR, job_id, name, error, attempts, op="step")

    async def begin_sleep(self, job_id: int, name: str, until: float) -> float:
        rows = await self._fetch(wq.BEGIN_SLEEP, job_id, name, until, op="step")
        return rows[0]["until"]

    async def spawn_children(self, job_id: int, name: str, jobs: list[NewJob]) -> list[int]:
        rows = await self._fetch(
            wq.SPAWN_CHILDREN, job_id, name, job_rows_json(jobs), op="spawn",
        )
        return msgspec.json.decode(rows[0]["ids"])

    async def gather_children(self, job_id: int, token: int, waiting_on: str,
                              ids: list[int]) -> list[dict[str, Any]]:
        rows = await self._fetch(wq.GATHER_CHILDREN, job_id, token, waiting_on, ids, op="gather")
        return [dict(r) for r in rows]

    async def begin_wait(self, job_id: int, token: int, step: str, event: str, match: str,
                         timeout_s: float | None) -> tuple[str, str | None, float]:
        row = (await self._fetch(wq.BEGIN_WAIT, job_id, token, step, event, match, timeout_s,
                                 op="wait"))[0]
        return row["wait"], row["event"], row["now"]

    async def send_event(self, name: str, data: str) -> tuple[int, list[int]]:
        row = (await self._fetch(wq.SEND_EVENT, name, data, op="event"))[0]
        return row["id"], list(row["woken"])

    async def wake_waiting(self, limit: int) -> list[int]:
        return [r["id"] for r in await self._fetch(wq.WAKE_WAITING, limit, op="wake")]

    async def prune_events(self, max_age_s: float, limit: int,
                           now: datetime | None = None) -> int:
        return await self._count(wq.PRUNE_EVENTS, max_age_s, limit, now, op="prune")

    async def register_failure_hooks(self, kinds: list[str]) -> None:
        if kinds:
            await self._execute(wq.REGISTER_FAILURE_HOOKS, kinds)

    async def workflow_details(self, job_id: int) -> tuple[str | None, str, str]:
        row = (await self._fetch(wq.WORKFLOW_DETAILS, job_id, op="get"))[0]
        return row["waiting_on"], row["steps"], row["children"]
