"""What an attempt's ending is written as: the result encoded as Postgres can store it,
the error JSON kept in a job's `errors`, what an error says about the job's key, and
the fallback outcome when Postgres refuses one. Shared by the worker (which builds
outcomes) and the completer and dispatcher (which read them back).
"""

from __future__ import annotations

from typing import Any

import msgspec

from actors import retry
from actors.context import clean_text
from actors.ports import Outcome
from actors.validate import has_nul


def encode_result(result: Any, limit: int | None) -> str:
    """The result as JSON Postgres can store (jsonb), within `limit` bytes (None: any)."""
    try:
        encoded = msgspec.json.encode(result)
    except RecursionError as exc:
        raise InvalidValue("result is self-referencing (or nested too deeply) and "
                           "cannot be encoded as JSON") from exc
    except UnicodeEncodeError as exc:
        raise InvalidValue("result contains a lone surrogate "
                           f"({exc.object[exc.start:exc.end]!a}), which is not valid "
                           "UTF-8 and cannot be stored") from exc
    except (TypeError, msgspec.EncodeError):
        raise
    except Exception as exc:  # noqa: BLE001 - anything else msgspec refuses
        raise InvalidValue(f"result cannot be encoded as JSON: {exc!r}") from exc
    if has_nul(encoded):
        raise InvalidValue("result contains a NUL character (\\u0000), which Postgres "
                           "cannot store in jsonb; strip or escape it")
    if limit is not None and len(encoded) > limit:
        raise InvalidValue(f"result is {len(encoded)} bytes encoded, over the limit of "
                           f"{limit} bytes (limits.max_result_bytes)", "result_too_large")
    return encoded.decode()


def remote_signal(decision: retry.Decision) -> tuple[str | None, float | None]:
    """What an error says about the job's key: back-pressure, a failure, or nothing.

    A rate limit (HTTP 429, RateLimited) pauses the whole key on every daemon for the time
    the remote gave (None: the queue's rate_limit_pause) and slows its adaptive rate; a
    snooze (RetryAfter) concerns this job only; network-ish failures count toward the
    key's breaker; a job's own bad input (validation, 4xx, Fail) says nothing about the
    remote side.
    """
    if decision.error_class == "rate_limit":
        return "rate_limited", decision.pause_s
    if decision.error_class in ("network", "timeout", "unknown"):
        return "fail", None
    return None, None


class InvalidValue(ValueError):
    """A result Postgres cannot store (or over the size limit): fails its attempt."""

    def __init__(self, message: str, error_class: str = "invalid_value"):
        super().__init__(message)
        self.error_class = error_class


def summarize(exc: BaseException) -> dict[str, Any]:
    """retry.summarize, safe against an exception whose str() raises."""
    try:
        return retry.summarize(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the attempt
        return {"type": type(exc).__name__, "message": "<the exception could not be printed>"}


def encode_error(value: dict[str, Any]) -> str:
    # Error messages and tracebacks are kept, with unstorable characters replaced.
    value = {k: clean_text(v) if isinstance(v, str) else v for k, v in value.items()}
    return msgspec.json.encode(value).decode()


class _ErrorClass(msgspec.Struct):
    cls: str = msgspec.field(default="unknown", name="class")


_error_class_decoder = msgspec.json.Decoder(_ErrorClass)


def error_class(error: str | None) -> str:
    """The `class` of an attempt error as stored in a job's `errors` ("unknown" if none)."""
    try:
        return _error_class_decoder.decode(error or "{}").cls
    except msgspec.DecodeError:
        return "unknown"


def refused_outcome(outcome: Outcome, exc: BaseException) -> Outcome:
    """An outcome Postgres refused (a NUL byte in a result, a lone surrogate in an error):
    the attempt fails with `invalid_value` instead, keeping its retry decision.

    A workflow's suspension whose record was refused (a NUL byte in a step name) fails:
    without its sleep or wait stored, the job would suspend again on every run."""
    suspends = outcome.waiting_on is not None or outcome.state == "waiting" or (
        outcome.steps is not None and outcome.steps != "[]")
    state = "failed" if outcome.state == "completed" or suspends else outcome.state
    error = encode_error({
        "class": "invalid_value",
        "message": f"the database refused this attempt's {outcome.state} outcome "
                   f"(a value it cannot store, such as a NUL byte): {clean_text(str(exc)[:500])}",
    })
    return msgspec.structs.replace(outcome, state=state, result=None, error=error,
                                   refund=0 if suspends else outcome.refund,
                                   delay_s=None if suspends else outcome.delay_s,
                                   steps=None, waiting_on=None)
