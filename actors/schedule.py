"""Pure schedule arithmetic: when a schedule's occurrences fall, which ones to fire.

No I/O and no clock: every function takes the instants it needs, so the tests pin them.

Cron expressions are local wall-clock times in the schedule's time zone, enumerated
by croniter on naive datetimes (plain calendar arithmetic) and then mapped to instants
by one rule, ours, so daylight-saving transitions behave the same everywhere:

- **A local time that does not exist** (spring forward: 02:30 on the day clocks jump
  from 02:00 to 03:00) fires once, at the first instant after the gap (03:00 local).
  Several matches inside one gap (`*/15` at 02:00, 02:15, ...) collapse into that one
  fire.
- **A local time that exists twice** (fall back: 01:30 on the day clocks go from 02:00
  back to 01:00) fires once, at its first occurrence (the earlier, summer-time instant).
  That holds for wildcard expressions too: a `*/15 * * * *` schedule does not fire
  during the repeated hour. Use `every` (or `tz = "UTC"`) for strictly periodic work.

`every` schedules are fixed intervals anchored at the Unix epoch (UTC), so all daemons
agree on the occurrences and a restart does not shift them; time zones do not apply.

Missed occurrences: an occurrence is *on time* while it is at most `grace` old; those
always fire. Older ones (every daemon was down, or the schedule's scheduler stalled)
follow the schedule's policy: `skip` drops them, `latest` fires only the newest of
them and only when no on-time occurrence fires, `all` fires them, the newest
`missed_limit` at most.
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from croniter import croniter

from actors.ports import ScheduleDef
from protocol.durations import parse_duration
from protocol.schedules import (
    DURATION_MAX_S,
    EVERY_MIN_S,
    MAX_ATTEMPTS_MAX,
    PRIORITY_MAX,
    PRIORITY_MIN,
    TIMEOUT_MAX_S,
    TZ_MAX_CHARS,
    ScheduleSpec,
)

MISSED_POLICIES = ("skip", "latest", "all")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The longest a DST fold lasts anywhere (Lord Howe: 30 min; historic double summer time: 2 h).
_MAX_FOLD = timedelta(hours=3)


class Timing(msgspec.Struct, frozen=True, kw_only=True):
    """When a schedule fires: a cron expression in `tz`, or a fixed interval."""

    cron: str | None = None
    every_s: float | None = None
    tz: str = "UTC"


class Plan(msgspec.Struct, kw_only=True):
    fire: list[datetime]  # occurrences to fire, oldest first
    skipped: int  # missed occurrences the policy dropped
    advance_to: datetime | None  # the new watermark; None: nothing was due


def validate(timing: Timing) -> None:
    """Raise ValueError naming what is wrong with a timing."""
    if (timing.cron is None) == (timing.every_s is None):
        raise ValueError("a schedule needs exactly one of `cron` and `every`")
    zone(timing.tz)
    if timing.every_s is not None:
        if not timing.every_s >= EVERY_MIN_S:
            raise ValueError(f"`every` must be at least 1ms, got {timing.every_s}")
        check_duration("every", timing.every_s)
        return
    assert timing.cron is not None
    fields = timing.cron.split()
    if not timing.cron.startswith("@") and len(fields) != 5:
        raise ValueError(f"cron expression {timing.cron!r} must have 5 fields "
                         "(minute hour day-of-month month day-of-week) or be an @alias")
    if not croniter.is_valid(timing.cron):
        raise ValueError(f"invalid cron expression {timing.cron!r}")
    try:
        next_after(timing, datetime.now(UTC))
    except ValueError:  # CroniterBadDateError: e.g. "0 0 30 2 *" never happens
        raise ValueError(f"cron expression {timing.cron!r} never fires") from None


def zone(name: str) -> ZoneInfo:
    if not isinstance(name, str) or not 0 < len(name) <= TZ_MAX_CHARS:
        shown = name if not isinstance(name, str) else f"{name[:40]}... ({len(name)} characters)"
        raise ValueError(f"unknown time zone {shown!r} (a zone name is 1 to {TZ_MAX_CHARS} "
                         "characters)")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        # OSError: a name the tzdata lookup turns into a path the OS refuses.
        raise ValueError(f"unknown time zone {name!r}") from exc


def check_duration(field: str, value: float) -> None:
    """every / jitter / grace, parsed: within [0, DURATION_MAX_S] ("99999999d" parses)."""
    if not 0 <= value <= DURATION_MAX_S:  # NaN fails too
        raise ValueError(f"`{field}` must be at most {DURATION_MAX_S} s (ten years), "
                         f"got {value:g} s")


def check_durations(spec: ScheduleSpec) -> tuple[float | None, float, float]:
    """(every_s, jitter_s, grace_s) of a declared schedule, each parsed and in range."""
    every_s = every_seconds(spec.every)
    jitter_s = parse_duration(spec.jitter) if spec.jitter is not None else 0.0
    grace_s = parse_duration(spec.grace)
    for field, value in (("every", every_s), ("jitter", jitter_s), ("grace", grace_s)):
        if value is not None:
            check_duration(field, value)
    return every_s, jitter_s, grace_s


def check_row(row: ScheduleDef) -> None:
    """Raise ValueError naming the first value of a stored schedule out of its range.

    Rows are validated on the way in (definition, migration 0013's CHECK); this is for
    one that slipped in anyway (an older daemon, a hand-written INSERT, a dropped
    constraint), so the scheduler skips it instead of crashing on its date arithmetic.
    """
    validate(timing_of(row))
    check_duration("jitter", row.jitter_s)
    check_duration("grace", row.grace_s)
    if row.missed not in MISSED_POLICIES:
        raise ValueError(f"missed must be one of {', '.join(MISSED_POLICIES)}, got {row.missed!r}")
    if not 1 <= row.missed_limit <= 100_000:
        raise ValueError(f"missed_limit must be 1 to 100000, got {row.missed_limit}")
    if row.timeout_s is not None and not 0 < row.timeout_s <= TIMEOUT_MAX_S:
        raise ValueError(f"timeout_s must be > 0 and <= {TIMEOUT_MAX_S:g}, got {row.timeout_s}")
    if row.max_attempts is not None and not 1 <= row.max_attempts <= MAX_ATTEMPTS_MAX:
        raise ValueError(f"max_attempts must be 1 to {MAX_ATTEMPTS_MAX}, got {row.max_attempts}")
    if row.priority is not None and not PRIORITY_MIN <= row.priority <= PRIORITY_MAX:
        raise ValueError(f"priority must be {PRIORITY_MIN} to {PRIORITY_MAX}, got {row.priority}")


def every_seconds(value: str | float | int | None) -> float | None:
    return None if value is None else parse_duration(value)


# -- occurrences -----------------------------------------------------------------------


def to_instant(local: datetime, tz: ZoneInfo) -> datetime:
    """The instant a naive local wall-clock time fires at, by the DST rule above."""
    first = local.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if _wall(first, tz) == local:
        return first  # exists (once, or twice: fold=0 is the first occurrence)
    second = local.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if _wall(second, tz) == local:
        return second
    # In a gap: zoneinfo reads fold=1 with the old offset (an instant before the jump)
    # and fold=0 with the new one (after it). The jump is the first instant in between
    # whose wall clock reads later than `local`; transitions fall on whole seconds.
    lo, hi = min(first, second), max(first, second)
    lo_s, hi_s = math.floor(lo.timestamp()), math.ceil(hi.timestamp())
    while hi_s - lo_s > 1:
        mid = (lo_s + hi_s) // 2
        if _wall(datetime.fromtimestamp(mid, UTC), tz) > local:
            hi_s = mid
        else:
            lo_s = mid
    return datetime.fromtimestamp(hi_s, UTC)


def _wall(instant: datetime, tz: ZoneInfo) -> datetime:
    return instant.astimezone(tz).replace(tzinfo=None)


def occurrences(timing: Timing, after: datetime, until: datetime, limit: int = 10_000
                ) -> list[datetime]:
    """Occurrences in (after, until], oldest first, the newest `limit` at most (UTC)."""
    found: list[datetime] = []
    for t in _backwards(timing, until):
        if t <= after or len(found) >= limit:
            break
        found.append(t)
    found.reverse()
    return found


def next_after(timing: Timing, after: datetime) -> datetime:
    """The first occurrence strictly after `after`."""
    if timing.every_s is not None:
        step = _step_us(timing)
        k = _us(after) // step + 1
        return _EPOCH + timedelta(microseconds=k * step)
    tz = zone(timing.tz)
    assert timing.cron is not None
    # Start from the wall clock at `after`; in the second pass of a fold, wall times
    # just ahead map to instants already past, which the loop skips.
    it = croniter(timing.cron, _wall(after, tz))
    while True:
        t = to_instant(it.get_next(datetime), tz)
        if t > after:
            return t


def _backwards(timing: Timing, until: datetime):
    """Occurrences at or before `until`, newest first, each instant once."""
    if timing.every_s is not None:
        step = _step_us(timing)
        k = _us(until) // step
        while True:
            yield _EPOCH + timedelta(microseconds=k * step)
            k -= 1
    tz = zone(timing.tz)
    assert timing.cron is not None
    # croniter's get_prev is exclusive and cron has minute resolution: start 1 s past
    # the wall clock at `until`. Near a fold, wall times ahead of it can still map to
    # instants at or before `until` (the first pass), so start one fold further.
    start = _wall(until, tz) + timedelta(seconds=1)
    offsets = {(until + d).astimezone(tz).utcoffset() for d in (-_MAX_FOLD, _MAX_FOLD)}
    if len(offsets) > 1:
        start += _MAX_FOLD
    it = croniter(timing.cron, start)
    last: datetime | None = None
    while True:
        t = to_instant(it.get_prev(datetime), tz)
        if t > until or t == last:
            continue
        last = t
        yield t


def _us(t: datetime) -> int:
    delta = t - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _step_us(timing: Timing) -> int:
    assert timing.every_s is not None
    return max(1, round(timing.every_s * 1_000_000))


# -- policy ------------------------------------------------------------------------------


def plan(timing: Timing, handled_until: datetime, now: datetime, *, missed: str = "latest",
         missed_limit: int = 100, grace_s: float = 60.0) -> Plan:
    """What to fire at `now` for occurrences after the watermark `handled_until`."""
    if missed not in MISSED_POLICIES:
        raise ValueError(f"missed must be one of {', '.join(MISSED_POLICIES)}, got {missed!r}")
    on_time_from = now - timedelta(seconds=grace_s)
    on_time: list[datetime] = []
    late: list[datetime] = []
    late_seen = 0
    # Newest first; stop as soon as the policy can use nothing older.
    for t in _backwards(timing, now):
        if t <= handled_until:
            break
        if t >= on_time_from:
            on_time.append(t)
            continue
        late_seen += 1
        if missed == "skip" or (missed == "latest" and (on_time or late)):
            break  # older ones are dropped whatever they are; no need to enumerate them
        if missed == "all" and len(late) >= missed_limit:
            break
        late.append(t)
    if missed == "skip" or (missed == "latest" and on_time):
        late = []
    fire = sorted(on_time + late)
    due = bool(on_time) or late_seen > 0
    skipped = late_seen - len(late)
    return Plan(fire=fire, skipped=skipped, advance_to=now if due else None)


def jitter_offset(name: str, fire_at: datetime, jitter_s: float) -> float:
    """A delay in [0, jitter_s), the same on every daemon for one (schedule, occurrence)."""
    if jitter_s <= 0:
        return 0.0
    digest = hashlib.sha256(f"{name}\x00{iso(fire_at)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * jitter_s


def iso(t: datetime) -> str:
    """The canonical text of an occurrence: UTC, ISO 8601 (keys and tags use it)."""
    return t.astimezone(UTC).isoformat()


def unique_key(name: str, fire_at: datetime) -> str:
    return f"schedule:{name}:{iso(fire_at)}"


def fire_tags(name: str, fire_at: datetime) -> list[str]:
    return [f"schedule:{name}", f"fire:{iso(fire_at)}"]


def fire_at_from_tags(tags: list[str]) -> datetime | None:
    for tag in tags:
        if tag.startswith("fire:"):
            return datetime.fromisoformat(tag[5:])
    return None


def timing_of(row: ScheduleDef) -> Timing:
    return Timing(cron=row.cron, every_s=row.every_s, tz=row.tz)
