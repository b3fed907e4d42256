"""PgStore's job statements (sql/jobs.py): enqueue, claim, finish, progress, cancel, reads,
promotion and retention. Batches in, batches out: a round trip per job is a bug."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from actors.flow import FlowLimits
from actors.ports import Claimed, Enqueued, NewJob, Outcome, ProgressUpdate
from daemon.store.base import StoreBase
from daemon.store.sql import flow as flow_sql
from daemon.store.sql import jobs as sql
from daemon.store.sql.common import job_rows_json


class JobStatements(StoreBase):
    async def enqueue_many(self, jobs: list[NewJob]) -> list[Enqueued]:
        if not jobs:
            return []
        done: list[Enqueued] = await self._run(enqueue_rows, jobs, op="enqueue")
        return done

    async def enqueue_children(self, parent_id: int, jobs: list[NewJob]) -> list[Enqueued]:
        if not jobs:
            return []
        done: list[Enqueued] = await self._run(enqueue_rows, jobs, parent_id, op="enqueue")
        return done

    async def claim(
        self,
        queue: str,
        limit: int,
        owner: str,
        lease_s: float,
        kinds: list[str],
        now: datetime | None = None,
        paused_keys: list[str] | None = None,
        limits: FlowLimits | None = None,
    ) -> list[Claimed]:
        """Under flow control (`limits`), jobd.claim_flow applies every key limit."""
        if limits is None:
            rows = await self._fetch(
                sql.CLAIM, queue, limit, owner, lease_s, now, kinds, paused_keys or [],
                op="claim",
            )
        else:
            rows = await self._fetch(
                flow_sql.CLAIM_FLOW, queue, limit, owner, lease_s, now, kinds, paused_keys or [],
                msgspec.json.encode(limits).decode(), op="claim",
            )
        return [Claimed(*r) for r in rows]  # columns in field order (CLAIMED_COLUMNS)

    async def next_due(
        self, queue: str, kinds: list[str], paused_keys: list[str] | None = None
    ) -> float | None:
        due: float | None = await self._fetchval(
            sql.NEXT_DUE, queue, kinds, paused_keys or [], op="next_due"
        )
        return due

    async def finish_many(
        self, outcomes: list[Outcome],
        key_failures: Callable[[str, str, int], None] | None = None,
    ) -> set[int]:
        """Returns the ids actually finished; `key_failures(queue, key, n)` hears each key's
        consecutive-failure count after the batch (for breaker metrics)."""
        if not outcomes:
            return set()
        # In id order, as the heartbeat locks them: two statements never wait on each other crosswise.
        outcomes = sorted(outcomes, key=lambda o: o.id)
        rows = await self._fetch(sql.FINISH_MANY, *outcome_columns(outcomes), op="finish")
        if key_failures is not None:
            for r in rows:
                if r["key"] is not None:
                    queue, _, key = r["key"].partition(":")
                    key_failures(queue, key, r["failures"])
        return {r["id"] for r in rows if r["id"] is not None}

    async def write_progress(self, updates: list[ProgressUpdate], lease_s: float) -> None:
        if updates:
            await self._execute(
                sql.WRITE_PROGRESS,
                [u.id for u in updates],
                [u.token for u in updates],
                [u.pct for u in updates],
                [u.note for u in updates],
                lease_s,
                op="progress",
            )

    async def cancel(self, job_id: int) -> tuple[str, str] | None:
        rows = await self._fetch(sql.CANCEL, job_id)
        return (rows[0]["was"], rows[0]["now"]) if rows else None

    async def running_cancel_requests(self, daemon_id: str) -> list[int]:
        return [r["id"] for r in await self._fetch(sql.RUNNING_CANCEL_REQUESTS, daemon_id)]

    async def get_job(self, job_id: int) -> dict[str, Any] | None:
        rows = await self._fetch(sql.GET_JOB, job_id)
        return dict(rows[0]) if rows else None

    async def stats(self) -> list[tuple[str, str, int]]:
        return [(r["queue"], r["state"], r["n"]) for r in await self._fetch(sql.STATS)]

    async def promote_due(self, limit: int, now: datetime | None = None) -> int:
        return await self._count(sql.PROMOTE_DUE, limit, now)

    async def prune_finished(
        self,
        state: str,
        max_age_s: float,
        max_count: int,
        limit: int,
        now: datetime | None = None,
    ) -> int:
        return await self._count(
            sql.PRUNE_FINISHED, state, max_age_s, max_count, limit, now, op="prune"
        )


async def enqueue_rows(connection: asyncpg.Connection, jobs: list[NewJob],
                       parent_id: int | None = None) -> list[Enqueued]:
    """ENQUEUE_MANY (ENQUEUE_CHILDREN under `parent_id`) on an asyncpg connection, on the
    asyncio side: the daemon's enqueues (through the bridge) and the direct producer's
    (daemon/producer.py, on the application's loop, maybe inside its transaction) are
    this one function."""
    if parent_id is None:
        rows = await connection.fetch(sql.ENQUEUE_MANY, job_rows_json(jobs))
    else:
        rows = await connection.fetch(sql.ENQUEUE_CHILDREN, job_rows_json(jobs), parent_id)
    out = []
    for job, row in zip(jobs, rows, strict=True):
        job_id = row["id"]
        if job_id is None:
            # The unique-key holder was inserted by a transaction that committed after
            # this statement's snapshot; the next statement's snapshot sees it.
            job_id = await connection.fetchval(sql.FIND_UNFINISHED_BY_UNIQUE_KEY, job.unique_key)
        out.append(Enqueued(id=job_id, created=row["created"]))
    return out


def outcome_columns(outcomes: list[Outcome]) -> tuple[list[Any], ...]:
    """FINISH_MANY's $1..$9: one array per Outcome field."""
    return (
        [o.id for o in outcomes],
        [o.token for o in outcomes],
        [o.state for o in outcomes],
        [o.result for o in outcomes],
        [o.delay_s for o in outcomes],
        [o.error for o in outcomes],
        [o.refund for o in outcomes],
        [o.flow for o in outcomes],
        [o.pause_s for o in outcomes],
    )
