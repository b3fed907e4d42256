"""The last check before a job row goes to the store, whichever surface built it.

Commands are range-checked when they are decoded (protocol/jobs.py), but rows are also
built from a handler's declaration, a handler's `ctx.enqueue`/`spawn`, a schedule or a
key function; this checks the finished row against the same limits, so a bad value is
a typed error here, never a database error or a row that crashes an actor later.
"""

from __future__ import annotations

import math
from typing import Any

from actors.ports import NewJob
from protocol import jobs as limits
from protocol.errors import BadRequest, ErrorCode, JobdError

DEFAULT_MAX_ARGS_BYTES = 1 << 20  # config limits.max_args_bytes
_max_args_bytes = DEFAULT_MAX_ARGS_BYTES


def configure(max_args_bytes: int) -> None:
    """The daemon's limits.max_args_bytes, for rows built inside actors (ctx.enqueue,
    spawn, schedules) as well as by the control actor; set once at start."""
    global _max_args_bytes
    _max_args_bytes = max_args_bytes


def max_args_bytes() -> int:
    return _max_args_bytes


def check_new_job(row: NewJob, args_bytes: bytes | None = None,
                  max_args_bytes: int | None = None) -> None:
    """Raise BadRequest (or TOO_LARGE for args) naming the field that is out of range.

    `args_bytes` is the row's args as encoded, when the caller has them (saves encoding).
    Written for the common case (everything fine) to cost little: enqueue_batch runs it
    for up to 100,000 rows.
    """
    kind, queue, key, unique_key = row.kind, row.queue, row.key, row.unique_key
    if kind.__class__ is not str or not 0 < len(kind) <= _KIND_MAX or "\x00" in kind:
        _text("kind", kind, _KIND_MAX, required=True)
    if queue.__class__ is not str or not 0 < len(queue) <= _QUEUE_MAX or "\x00" in queue:
        _text("queue", queue, _QUEUE_MAX, required=True)
    if key is not None and (key.__class__ is not str or not 0 < len(key) <= _KEY_MAX
                            or "\x00" in key):
        _text("key", key, _KEY_MAX, required=True)
    if unique_key is not None and (unique_key.__class__ is not str
                                   or not 0 < len(unique_key) <= _UNIQUE_KEY_MAX
                                   or "\x00" in unique_key):
        _text("unique_key", unique_key, _UNIQUE_KEY_MAX, required=True)
    tags = row.tags
    if tags:
        if len(tags) > limits.TAGS_MAX:
            raise BadRequest(f"tags: at most {limits.TAGS_MAX} tags, got {len(tags)}",
                             details={"field": "tags", "limit": limits.TAGS_MAX})
        for i, tag in enumerate(tags):
            if tag.__class__ is not str or len(tag) > limits.TAG_MAX_CHARS or "\x00" in tag:
                _text(f"tags[{i}]", tag, limits.TAG_MAX_CHARS)
    priority, max_attempts, cost = row.priority, row.max_attempts, row.cost
    if priority.__class__ is not int or not _PRIORITY_MIN <= priority <= _PRIORITY_MAX:
        _number("priority", priority, _PRIORITY_MIN, _PRIORITY_MAX, integer=True)
    if max_attempts.__class__ is not int or not 1 <= max_attempts <= _ATTEMPTS_MAX:
        _number("max_attempts", max_attempts, 1, _ATTEMPTS_MAX, integer=True)
    if cost.__class__ is not int or not 0 <= cost <= limits.COST_MAX:
        _number("cost", cost, 0, limits.COST_MAX, integer=True)
    delay_s = row.delay_s
    if delay_s is not None and (delay_s.__class__ not in _NUMBERS
                                or not 0 <= delay_s <= limits.DELAY_MAX_S):
        _number("delay_s", delay_s, 0, limits.DELAY_MAX_S)
    timeout_s = row.timeout_s
    if timeout_s is not None and (timeout_s.__class__ not in _NUMBERS
                                  or not 0 < timeout_s <= limits.TIMEOUT_MAX_S):
        _number("timeout_s", timeout_s, 0, limits.TIMEOUT_MAX_S, open_low=True)
    encoded = args_bytes if args_bytes is not None else row.args.encode()
    if max_args_bytes is None:
        max_args_bytes = _max_args_bytes
    if len(encoded) > max_args_bytes:
        raise JobdError(
            f"args: {len(encoded)} bytes of JSON is over the limit of {max_args_bytes} "
            "bytes (limits.max_args_bytes); store large inputs elsewhere and pass a reference",
            code=ErrorCode.TOO_LARGE,
            details={"field": "args", "bytes": len(encoded), "limit": max_args_bytes})
    if b"\\u0000" in encoded and has_nul(encoded):
        raise JobdError(
            f"{row.kind}: args contain a NUL character (\\u0000), which Postgres cannot "
            "store; remove or escape it", code=ErrorCode.INVALID_ARGS,
            details={"kind": row.kind, "field": "args"})


_KIND_MAX, _QUEUE_MAX = limits.KIND_MAX_CHARS, limits.QUEUE_MAX_CHARS
_KEY_MAX, _UNIQUE_KEY_MAX = limits.KEY_MAX_CHARS, limits.UNIQUE_KEY_MAX_CHARS
_PRIORITY_MIN, _PRIORITY_MAX = limits.PRIORITY_MIN, limits.PRIORITY_MAX
_ATTEMPTS_MAX = limits.MAX_ATTEMPTS_MAX
_NUMBERS = (int, float)


def has_nul(encoded: bytes) -> bool:
    """Does this JSON hold a \\u0000 escape (not an escaped backslash before `u0000`)?"""
    at = encoded.find(b"\\u0000")
    while at != -1:
        slashes = 0
        while at - slashes - 1 >= 0 and encoded[at - slashes - 1] == 0x5C:
            slashes += 1
        if slashes % 2 == 0:
            return True
        at = encoded.find(b"\\u0000", at + 1)
    return False


def _text(field: str, value: str | None, max_chars: int, *, required: bool = False) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise BadRequest(f"{field}: expected a string, got {type(value).__name__}",
                         details={"field": field})
    if required and not value:
        raise BadRequest(f"{field}: must not be empty", details={"field": field})
    if len(value) > max_chars:
        raise BadRequest(f"{field}: at most {max_chars} characters, got {len(value)}",
                         details={"field": field, "limit": max_chars})
    if "\x00" in value:
        raise BadRequest(f"{field}: contains a NUL character (\\u0000), which Postgres "
                         "cannot store", details={"field": field})


def _number(field: str, value: Any, low: float, high: float, *, integer: bool = False,
            open_low: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, _NUMBERS)
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"{field}: expected {kind}, got {type(value).__name__}",
                         details={"field": field})
    if (isinstance(value, float) and not math.isfinite(value)) or value > high or (value <= low if open_low else value < low):
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        raise BadRequest(f"{field}: must be {bound} and <= {high:g}, got {value!r}",
                         details={"field": field, "min": low, "max": high})
