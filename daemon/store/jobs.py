"""PgStore's job statements (sql/jobs.py): enqueue, claim, finish, progress, cancel, reads,
promotion and retention. Batches in, batches out: a round trip per job is a bug."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from actors.flow import FlowLimits
from actors.ports import Claimed, Enqueued, NewJob, Outcome, ProgressUpdate, ValueRejected
from actors.tools import Tools
from daemon.store.base import StoreBase
from daemon.store.sql import flow as flow_sql
from daemon.store.sql import jobs as sql
from daemon.store.sql.common import job_rows_json

# Batches at least this long with no unique key go by COPY (copy_jobs): below it the
# statement's one round trip beats COPY's four (begin, ids, copy, commit); measured
# break-even on this VM was between 64 and 128 rows.
COPY_MIN_ROWS = 128


class JobStatements(StoreBase):
    async def enqueue_many(self, jobs: list[NewJob]) -> list[Enqueued]:
        if not jobs:
            return []
        done: list[Enqueued] = await self._run(enqueue_rows, jobs, op="enqueue")
        self._count_tools(jobs, done)
        return done

    async def enqueue_children(self, parent_id: int, jobs: list[NewJob]) -> list[Enqueued]:
        if not jobs:
            return []
        done: list[Enqueued] = await self._run(enqueue_rows, jobs, parent_id, op="enqueue")
        self._count_tools(jobs, done)
        return done

    def _count_tools(self, jobs: list[NewJob], done: list[Enqueued]) -> None:
        counts: dict[tuple[str, str], int] = {}
        for job, d in zip(jobs, done, strict=True):
            if d.outcome is not None:
                counts[job.kind, d.outcome] = counts.get((job.kind, d.outcome), 0) + 1
        for (kind, outcome), n in counts.items():
            self.observer.flow_tool_enqueued(kind, outcome, n)

    async def sync_kind_tools(self, declared: dict[str, Tools | None]) -> None:
        """jobd.kind_tools for the kinds declared here: their tools, or no row."""
        rows = [{"kind": kind, **msgspec.structs.asdict(tools)}
                for kind, tools in sorted(declared.items()) if tools is not None]
        bare = sorted(kind for kind, tools in declared.items() if tools is None)
        await self._execute(sql.SYNC_KIND_TOOLS, msgspec.json.encode(rows).decode(), bare)

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

    async def stats(self, finished: bool = True) -> list[tuple[str, str, int]]:
        statement = sql.STATS if finished else sql.STATS_UNFINISHED
        return [(r["queue"], r["state"], r["n"]) for r in await self._fetch(statement)]

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


def _copyable(jobs: list[NewJob]) -> bool:
    """COPY has no ON CONFLICT: a batch with any unique key takes the statement whole, so
    duplicates inside it still map to one job and the batch stays one transaction."""
    return len(jobs) >= COPY_MIN_ROWS and all(
        j.unique_key is None and j.tool_keys is None for j in jobs)


async def copy_jobs(connection: asyncpg.Connection, jobs: list[NewJob],
                    parent_id: int | None) -> list[int]:
    """Insert `jobs` by binary COPY in one transaction (all or none); their ids, in order.
    Runs on the asyncio side (StoreBase._run)."""
    async with connection.transaction():
        reserved = await connection.fetchrow(sql.RESERVE_JOB_IDS, len(jobs))
        ids: list[int] = reserved["ids"]
        columns = copy_columns(jobs, ids, reserved["now"], parent_id)
        try:
            await connection.copy_records_to_table(
                sql.COPY_TABLE, schema_name=sql.COPY_SCHEMA, columns=list(columns),
                records=zip(*columns.values(), strict=True))
        except (OverflowError, TypeError, ValueError) as exc:
            # asyncpg encodes each value before sending it: one it cannot (the edge
            # lets none through) is the caller's, as Postgres' own refusals are.
            raise ValueRejected(f"bad value: {exc}") from exc
    return ids


def copy_columns(jobs: list[NewJob], ids: list[int], now: datetime,
                 parent_id: int | None) -> dict[str, list[Any]]:
    """COPY's columns (sql.COPY_ALWAYS, then the optional ones some row needs), each
    the list of its values in row order."""
    columns: dict[str, list[Any]] = dict(zip(sql.COPY_ALWAYS, (
        ids, [j.queue for j in jobs], [j.kind for j in jobs], [j.args for j in jobs],
        [j.priority for j in jobs], [j.max_attempts for j in jobs]), strict=True))
    if any(j.key is not None for j in jobs):
        columns["key"] = [j.key for j in jobs]
    if any(j.delay_s for j in jobs):
        # ENQUEUE_MANY's float8 * interval '1 second' rounds the microseconds half to
        # even, as round() does: the same run_at to the microsecond.
        columns["run_at"] = [now + timedelta(microseconds=round(j.delay_s * 1e6))
                             if j.delay_s else now for j in jobs]
        columns["state"] = ["scheduled" if j.delay_s and j.delay_s > 0 else "available"
                            for j in jobs]
    if any(j.tags for j in jobs):
        columns["tags"] = [j.tags for j in jobs]
    if any(j.timeout_s is not None for j in jobs):
        columns["timeout_s"] = [j.timeout_s for j in jobs]
    if any(j.cost != 1 for j in jobs):
        columns["cost"] = [j.cost for j in jobs]
    if parent_id is not None:
        columns["parent_id"] = [parent_id] * len(jobs)
    if any(j.traceparent is not None for j in jobs):
        columns["traceparent"] = [j.traceparent for j in jobs]
    return columns


async def enqueue_rows(connection: asyncpg.Connection, jobs: list[NewJob],
                       parent_id: int | None = None) -> list[Enqueued]:
    """A batch of new jobs (children of `parent_id` if given) on an asyncpg connection, on
    the asyncio side: the daemon's enqueues (through the bridge) and the direct producer's
    (daemon/producer.py, on the application's loop, maybe inside its transaction) are
    this one function. A long batch without unique keys goes by COPY (copy_jobs)."""
    if _copyable(jobs):
        ids = await copy_jobs(connection, jobs, parent_id)
        return [Enqueued(id=i, created=True) for i in ids]
    return await insert_rows(connection, jobs, parent_id)


async def insert_rows(connection: asyncpg.Connection, jobs: list[NewJob],
                      parent_id: int | None = None) -> list[Enqueued]:
    """The statement path of enqueue_rows, for any batch: ENQUEUE_PLAIN without unique
    keys, else ENQUEUE_MANY / ENQUEUE_CHILDREN, which answer a held key with its job.
    Rows of kinds with flow-control tools go through jobd.enqueue_tools (migration 0020)
    in the same transaction; a batch without any costs one attribute test per row."""
    if any(j.tool_keys is not None for j in jobs):
        return await _insert_mixed(connection, jobs, parent_id)
    if all(j.unique_key is None for j in jobs):
        ids = sorted(r[0] for r in await connection.fetch(sql.ENQUEUE_PLAIN, job_rows_json(jobs),
                                                           parent_id))
        return [Enqueued(id=i, created=True) for i in ids]
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


async def _insert_mixed(connection: asyncpg.Connection, jobs: list[NewJob],
                        parent_id: int | None) -> list[Enqueued]:
    tooled = [i for i, j in enumerate(jobs) if j.tool_keys is not None]
    plain = [i for i, j in enumerate(jobs) if j.tool_keys is None]
    out: list[Enqueued | None] = [None] * len(jobs)
    async with connection.transaction():
        rows = await connection.fetch(sql.ENQUEUE_TOOLS, job_rows_json([jobs[i] for i in tooled]),
                                      parent_id, None)
        for i, row in zip(tooled, rows, strict=True):
            out[i] = Enqueued(id=row["id"], created=row["created"], outcome=row["outcome"])
        if plain:
            for i, done in zip(plain, await insert_rows(connection, [jobs[i] for i in plain],
                                                        parent_id), strict=True):
                out[i] = done
    return [e for e in out if e is not None]


def outcome_columns(outcomes: list[Outcome]) -> tuple[list[Any], ...]:
    """FINISH_MANY's $1..$11: one array per Outcome field."""
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
        [o.steps for o in outcomes],
        [o.waiting_on for o in outcomes],
    )
