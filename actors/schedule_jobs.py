"""Where schedules meet handlers: a declared schedule checked against its kind's handler
(as an enqueue is), and the job an occurrence enqueues (built by actors/jobs.py, so
the handler's key and cost apply as they do to any enqueue).

The arithmetic of when occurrences fall is actors/schedule.py, which knows no handler.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from actors import jobs
from actors.errors import InvalidArgs
from actors.handlers import Handlers
from actors.ports import Occurrence, ScheduleDef
from actors.schedule import (
    Timing,
    check_durations,
    check_row,
    fire_tags,
    jitter_offset,
    unique_key,
    validate,
)
from actors.validate import has_nul, max_args_bytes
from protocol.errors import JobdError
from protocol.schedules import ScheduleSpec


def definition(handlers: Handlers, spec: ScheduleSpec, *, source: str = "runtime"
               ) -> ScheduleDef:
    """Validate a declared schedule into what the store keeps.

    Raises ValueError (timing, durations), UnknownKind or InvalidArgs (checked against
    these handlers, like an enqueue).
    """
    every_s, jitter_s, grace_s = check_durations(spec)
    timing = Timing(cron=spec.cron, every_s=every_s, tz=spec.tz)
    validate(timing)
    jobdef = handlers.lookup(spec.kind)
    args = jobdef.decode_enqueued(spec.args)
    encoded = msgspec.json.encode(args)
    if len(encoded) > max_args_bytes():
        raise ValueError(f"args: {len(encoded)} bytes of JSON is over the limit of "
                         f"{max_args_bytes()} bytes (limits.max_args_bytes)")
    if has_nul(encoded):
        raise ValueError("args contain a NUL character (\\u0000), which Postgres cannot store")
    schedule = ScheduleDef(
        name=spec.name, kind=spec.kind, cron=spec.cron, every_s=every_s, tz=spec.tz,
        args=encoded.decode(), queue=spec.queue, key=spec.key,
        priority=spec.priority, max_attempts=spec.max_attempts, timeout_s=spec.timeout_s,
        tags=list(spec.tags), jitter_s=jitter_s, missed=spec.missed,
        missed_limit=spec.missed_limit, grace_s=grace_s, source=source,
    )
    check_row(schedule)  # a spec built in Python skipped the decoder's ranges
    return schedule


def occurrence(handlers: Handlers, row: ScheduleDef, fire_at: datetime, *,
               manual: bool = False) -> Occurrence:
    """The job one occurrence enqueues: the handler's defaults under the schedule's options,
    keyed and tagged by the occurrence. Raises UnknownKind / InvalidArgs."""
    try:
        job = jobs.build(
            handlers, row.kind, row.args, queue=row.queue, key=row.key,
            unique_key=unique_key(row.name, fire_at), priority=row.priority,
            delay_s=0.0 if manual else jitter_offset(row.name, fire_at, row.jitter_s),
            max_attempts=row.max_attempts or None,
            tags=[*row.tags, *fire_tags(row.name, fire_at)], timeout_s=row.timeout_s,
        )
    except JobdError as exc:  # e.g. a computed key over its limit: this row, not the scheduler
        raise InvalidArgs(f"{row.kind}: {exc.message}") from None
    return Occurrence(schedule=row.name, fire_at=fire_at, manual=manual, job=job)
