"""Schedules as they cross the process boundary: declared in the config file
(`[[schedules]]`), added over the control socket, listed back with their fire times."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from protocol.jobs import Key, Kind, MaxAttempts, Priority, QueueName, Tags, TimeoutS, text

ScheduleName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")]
# Ranges (README "Schedules"): the scheduler does date arithmetic with these, so a value
# out of range is refused here (bad_request) and by migration 0013's CHECK. They match
# protocol/jobs.py's job limits (timeout, attempts, priority, text lengths).
DURATION_MAX_S = 10 * 365 * 86400  # every, jitter, grace: at most ten years
EVERY_MIN_S = 0.001
TIMEOUT_MAX_S = 365 * 86400.0  # one year, as for a job
MAX_ATTEMPTS_MAX = 1000
PRIORITY_MIN, PRIORITY_MAX = -32768, 32767  # the jobs column is a smallint
TZ_MAX_CHARS = 64  # the longest IANA zone name is 32
CRON_MAX_CHARS = 200
# "30s", or seconds; the parsed value is bounded too (actors/schedule.py check_durations).
Duration = (text(64, 1) | Annotated[int, msgspec.Meta(ge=0, le=DURATION_MAX_S)]
            | Annotated[float, msgspec.Meta(ge=0, le=DURATION_MAX_S)])


class ScheduleSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One schedule. Exactly one of `cron` (5 fields, local time in `tz`) and `every`.

    Unset job options take the handler's declaration, as for an enqueue.
    """

    name: ScheduleName
    kind: Kind
    cron: text(CRON_MAX_CHARS, 1) | None = None  # type: ignore[valid-type]
    every: Duration | None = None  # "10s": fixed interval, anchored at the Unix epoch
    tz: text(TZ_MAX_CHARS, 1) = "UTC"  # type: ignore[valid-type]
    args: dict[str, Any] = {}
    queue: QueueName | None = None
    key: Key | None = None  # flow-control key
    priority: Priority | None = None
    max_attempts: MaxAttempts | None = None
    timeout_s: TimeoutS | None = None
    tags: Tags = []
    jitter: Duration | None = None  # each job starts up to this much after its occurrence
    missed: Annotated[str, msgspec.Meta(pattern=r"^(skip|latest|all)$")] = "latest"
    missed_limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100  # for missed = "all"
    grace: Duration = "60s"  # an occurrence at most this old is on time, not missed


class ScheduleView(msgspec.Struct, kw_only=True):
    name: str
    kind: str
    cron: str | None
    every_s: float | None
    tz: str
    args: Any
    queue: str | None
    key: str | None
    priority: int | None
    max_attempts: int | None
    timeout_s: float | None
    tags: list[str]
    jitter_s: float
    missed: str
    missed_limit: int
    grace_s: float
    paused: bool
    source: str  # "config" | "runtime"
    next_fire_at: datetime | None  # None while paused
    last_fire_at: datetime | None
    last_job_id: int | None
    created_at: datetime
    updated_at: datetime
    # Why the scheduler skips it (a stored value out of range, a zone this machine
    # lacks); None when it fires. next_fire_at is None then too.
    broken: str | None = None
