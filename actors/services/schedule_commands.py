"""The control actor's schedule commands: add, remove, pause, resume, trigger, list.

Each is a store call; the store's NOTIFY on `jobd_schedules` wakes every daemon's
scheduler, so no actor message is needed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from actors.errors import InvalidArgs, UnknownKind
from actors.handlers import Handlers
from actors.ports import FireTarget, ScheduleRow, Store
from actors.schedule import check_row, next_after, timing_of
from actors.schedule_jobs import definition, occurrence
from protocol import commands as c
from protocol.errors import BadRequest, ErrorCode, JobdError, NotFound
from protocol.schedules import ScheduleView

ScheduleCommand = (
    c.ScheduleAdd | c.ScheduleRemove | c.SchedulePause | c.ScheduleResume | c.ScheduleTrigger
    | c.ScheduleList
)


async def handle(store: Store, handlers: Handlers, cmd: ScheduleCommand) -> Any:
    match cmd:
        case c.ScheduleAdd():
            try:
                schedule = definition(handlers, cmd.schedule)
            except ValueError as exc:
                raise BadRequest(f"schedule {cmd.schedule.name!r}: {exc}") from None
            except UnknownKind as exc:
                raise JobdError(str(exc), code=ErrorCode.UNKNOWN_KIND,
                                details={"kind": cmd.schedule.kind}) from None
            except InvalidArgs as exc:
                raise JobdError(str(exc), code=ErrorCode.INVALID_ARGS,
                                details={"kind": cmd.schedule.kind}) from None
            row = await store.put_schedule(schedule, replace=cmd.replace)
            if row is None:
                raise JobdError(f"schedule {schedule.name!r} exists (use replace to overwrite)",
                                code=ErrorCode.CONFLICT, details={"name": schedule.name})
            now, row = await _get(store, schedule.name)
            return view(row, now)
        case c.ScheduleRemove():
            if not await store.delete_schedule(cmd.name):
                raise _not_found(cmd.name)
            return c.ScheduleRemoved(name=cmd.name)
        case c.SchedulePause() | c.ScheduleResume():
            paused = isinstance(cmd, c.SchedulePause)
            if await store.set_schedule_paused(cmd.name, paused) is None:
                raise _not_found(cmd.name)
            now, row = await _get(store, cmd.name)
            return view(row, now)
        case c.ScheduleTrigger():
            return await trigger(store, handlers, cmd.name, cmd.at)
        case c.ScheduleList():
            now, rows = await store.list_schedules()
            return c.ScheduleListResult(schedules=[view(r, now) for r in rows])
    raise JobdError(f"unhandled command {type(cmd).__name__}", code=ErrorCode.UNKNOWN_COMMAND)


async def trigger(store: Store, handlers: Handlers, name: str, at: datetime | None) -> c.ScheduleFired:
    """Fire one extra occurrence (at `at`, default the database's now), paused or not."""
    for _ in range(3):
        now, row = await _get(store, name)
        fire_at = now if at is None else (at if at.tzinfo else at.replace(tzinfo=UTC))
        try:
            check_row(row)
        except ValueError as exc:  # a stored row that slipped past the CHECK
            raise BadRequest(f"schedule {name!r} cannot fire: {exc}",
                             details={"name": name}) from None
        try:
            occ = occurrence(handlers, row, fire_at, manual=True)
        except UnknownKind as exc:
            raise JobdError(str(exc), code=ErrorCode.UNKNOWN_KIND,
                            details={"kind": row.kind}) from None
        except InvalidArgs as exc:
            raise JobdError(str(exc), code=ErrorCode.INVALID_ARGS,
                            details={"kind": row.kind}) from None
        fired, refused = await store.fire_schedules([FireTarget(name, row.revision, None)], [occ])
        if name in refused:
            continue  # redefined (or removed) between our read and the fire: read again
        job_id = fired[0].job_id if fired else None
        return c.ScheduleFired(name=name, fire_at=fire_at, job_id=job_id, created=bool(fired))
    raise JobdError(f"schedule {name!r} keeps changing; try again", code=ErrorCode.UNAVAILABLE)


def view(row: ScheduleRow, now: datetime) -> ScheduleView:
    upcoming = None
    broken = None
    try:
        check_row(row)
        if not row.paused:
            upcoming = next_after(timing_of(row), max(now, row.handled_until))
    except (ValueError, OverflowError) as exc:
        # A stored row out of range, or a zone this machine lacks: list it, say why.
        broken = str(exc)
    return ScheduleView(
        name=row.name, kind=row.kind, cron=row.cron, every_s=row.every_s, tz=row.tz,
        args=msgspec.json.decode(row.args), queue=row.queue, key=row.key,
        priority=row.priority, max_attempts=row.max_attempts, timeout_s=row.timeout_s,
        tags=list(row.tags), jitter_s=row.jitter_s, missed=row.missed,
        missed_limit=row.missed_limit, grace_s=row.grace_s, paused=row.paused,
        source=row.source, next_fire_at=upcoming, last_fire_at=row.last_fire_at,
        last_job_id=row.last_job_id, created_at=row.created_at, updated_at=row.updated_at,
        broken=broken,
    )


async def _get(store: Store, name: str) -> tuple[datetime, ScheduleRow]:
    found = await store.get_schedule(name)
    if found is None:
        raise _not_found(name)
    return found


def _not_found(name: str) -> NotFound:
    return NotFound(f"no schedule {name!r}", details={"name": name})
