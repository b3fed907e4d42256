"""PgStore's schedule statements (sql/schedules.py): definitions, and firing a batch of
occurrences exactly once across daemons."""

from __future__ import annotations

from datetime import datetime

import asyncpg
import msgspec

from actors.ports import Fired, FireTarget, Occurrence, ScheduleDef, ScheduleRow
from daemon.store.base import StoreBase
from daemon.store.sql import schedules as sq

_ROW_FIELDS = ScheduleRow.__struct_fields__


class ScheduleStatements(StoreBase):
    async def list_schedules(self, now: datetime | None = None
                             ) -> tuple[datetime, list[ScheduleRow]]:
        rows = await self._fetch(sq.LIST_SCHEDULES, now, op="schedules")
        return rows[0]["db_now"], [_schedule(r) for r in rows if r["name"] is not None]

    async def get_schedule(self, name: str, now: datetime | None = None
                           ) -> tuple[datetime, ScheduleRow] | None:
        rows = await self._fetch(sq.GET_SCHEDULE, name, now)
        return (rows[0]["db_now"], _schedule(rows[0])) if rows else None

    async def put_schedule(self, schedule: ScheduleDef, *, replace: bool,
                           now: datetime | None = None) -> ScheduleRow | None:
        """Insert (None if the name exists), or with `replace` insert-or-overwrite."""
        s = schedule
        rows = await self._fetch(
            sq.UPSERT_SCHEDULE if replace else sq.INSERT_SCHEDULE,
            s.name, s.kind, s.cron, s.every_s, s.tz, s.args, s.queue, s.key, s.priority,
            s.max_attempts, s.timeout_s, s.tags, s.jitter_s, s.missed, s.missed_limit,
            s.grace_s, s.source, s.paused, now,
        )
        return _schedule(rows[0]) if rows else None

    async def delete_schedule(self, name: str) -> bool:
        return bool(await self._fetch(sq.DELETE_SCHEDULE, name))

    async def set_schedule_paused(self, name: str, paused: bool, now: datetime | None = None
                                  ) -> ScheduleRow | None:
        rows = await self._fetch(sq.SET_SCHEDULE_PAUSED, name, paused, now)
        return _schedule(rows[0]) if rows else None

    async def fire_schedules(self, targets: list[FireTarget], occurrences: list[Occurrence],
                             now: datetime | None = None) -> tuple[list[Fired], set[str]]:
        """Fire in one statement; returns what fired and the names that were refused
        (removed, paused, or redefined since the caller read them)."""
        if not targets:
            return [], set()
        jobs = [o.job for o in occurrences]
        rows = await self._fetch(
            sq.FIRE_SCHEDULES,
            [t.name for t in targets], [t.revision for t in targets],
            [t.advance_to for t in targets],
            [o.schedule for o in occurrences], [o.fire_at for o in occurrences],
            [o.manual for o in occurrences],
            [j.kind for j in jobs], [j.args for j in jobs], [j.queue for j in jobs],
            [j.key for j in jobs], [j.priority for j in jobs], [j.max_attempts for j in jobs],
            [_array_literal(j.tags) for j in jobs], [j.timeout_s for j in jobs],
            [j.delay_s for j in jobs], [j.unique_key for j in jobs],
            now, [j.cost for j in jobs], op="fire",
        )
        fired = [Fired(r["schedule"], r["fire_at"], r["job_id"]) for r in rows
                 if r["status"] == "fired"]
        return fired, {r["schedule"] for r in rows if r["status"] == "stale"}

    async def prune_schedule_fires(self, keep_s: float, limit: int,
                                   now: datetime | None = None) -> int:
        return await self._count(sq.PRUNE_SCHEDULE_FIRES, keep_s, limit, now, op="prune")


def _schedule(row: asyncpg.Record) -> ScheduleRow:
    return ScheduleRow(**{f: row[f] for f in _ROW_FIELDS})


def _array_literal(items: list[str]) -> str:
    return "{" + ",".join(msgspec.json.encode(i).decode() for i in items) + "}"

