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


def check_new_job(row: NewJob, args_bytes: bytes | None = None,
                  max_args_bytes: int = DEFAULT_MAX_ARGS_BYTES) -> None:
    """Raise BadRequest (or TOO_LARGE for args) naming the field that is out of range.

    `args_bytes` is the row's args as encoded, when the caller has them (saves encoding).
    """
    _text("kind", row.kind, limits.KIND_MAX_CHARS, required=True)
    _text("queue", row.queue, limits.QUEUE_MAX_CHARS, required=True)
    _text("key", row.key, limits.KEY_MAX_CHARS, required=True)
    _text("unique_key", row.unique_key, limits.UNIQUE_KEY_MAX_CHARS, required=True)
    if len(row.tags) > limits.TAGS_MAX:
        raise BadRequest(f"tags: at most {limits.TAGS_MAX} tags, got {len(row.tags)}",
                         details={"field": "tags", "limit": limits.TAGS_MAX})
    for i, tag in enumerate(row.tags):
        _text(f"tags[{i}]", tag, limits.TAG_MAX_CHARS)
    _number("priority", row.priority, limits.PRIORITY_MIN, limits.PRIORITY_MAX, integer=True)
    _number("max_attempts", row.max_attempts, 1, limits.MAX_ATTEMPTS_MAX, integer=True)
    _number("cost", row.cost, 0, limits.COST_MAX, integer=True)
    if row.delay_s is not None:
        _number("delay_s", row.delay_s, 0, limits.DELAY_MAX_S)
    if row.timeout_s is not None:
        _number("timeout_s", row.timeout_s, 0, limits.TIMEOUT_MAX_S, open_low=True)
    encoded = args_bytes if args_bytes is not None else row.args.encode()
    if len(encoded) > max_args_bytes:
        raise JobdError(
            f"args: {len(encoded)} bytes of JSON is over the limit of {max_args_bytes} "
            "bytes (limits.max_args_bytes); store large inputs elsewhere and pass a reference",
            code=ErrorCode.TOO_LARGE,
            details={"field": "args", "bytes": len(encoded), "limit": max_args_bytes})
    if has_nul(encoded):
        raise JobdError(
            f"{row.kind}: args contain a NUL character (\\u0000), which Postgres cannot "
            "store; remove or escape it", code=ErrorCode.INVALID_ARGS,
            details={"kind": row.kind, "field": "args"})


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
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"{field}: expected {kind}, got {type(value).__name__}",
                         details={"field": field})
    if (isinstance(value, float) and not math.isfinite(value)) or value > high or (value <= low if open_low else value < low):
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        raise BadRequest(f"{field}: must be {bound} and <= {high:g}, got {value!r}",
                         details={"field": field, "min": low, "max": high})
