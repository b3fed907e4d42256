"""One classification table: what an exception means for the job that raised it.

Pure functions; the worker applies the decision. Classes and default first delays:

| class       | when                                             | then                      |
|-------------|--------------------------------------------------|---------------------------|
| rate_limit  | HTTP 429 or RateLimited (Retry-After / seconds    | retry after that; the key |
|             | honoured, else the 60 s backoff)                  | pauses (see Decision)     |
| snooze      | the handler raised RetryAfter(seconds)           | run again then            |
| network     | timeouts, refused/reset connections, 408, 5xx     | retry, 10 s base          |
| timeout     | the attempt ran past the job's timeout           | retry, 10 s base          |
| unknown     | anything else                                    | retry, 5 s base           |
| validation  | args or data that can never pass                 | fail now                  |
| client      | HTTP 400, 401, 403                               | fail now                  |
| fail        | the handler raised Fail                          | fail now                  |

Retries back off exponentially (base * 2^(attempt-1), capped) with +-25 % jitter.
"""

from __future__ import annotations

import random
import traceback
from typing import Any

import msgspec

from actors.errors import Fail, RateLimited, RetryAfter

BASE_DELAY_S = {"rate_limit": 60.0, "network": 10.0, "timeout": 10.0, "unknown": 5.0}
MAX_DELAY_S = 3600.0
_FAIL_NOW = {"validation", "client", "fail"}
_CLIENT_STATUSES = {400, 401, 403}


class Decision(msgspec.Struct, frozen=True):
    action: str  # "retry" | "fail" | "snooze"
    error_class: str
    delay_s: float = 0.0
    # rate_limit only: how long the remote asked the whole key to wait (Retry-After,
    # RateLimited(seconds)); None = it did not say, the queue's rate_limit_pause applies.
    pause_s: float | None = None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries, for httpx, aiohttp, requests and friends."""
    for holder in (exc, getattr(exc, "response", None)):
        if holder is None:
            continue
        for attr in ("status_code", "status"):
            value = getattr(holder, attr, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value
    return None


def retry_after_header(exc: BaseException) -> float | None:
    for holder in (exc, getattr(exc, "response", None)):
        headers = getattr(holder, "headers", None)
        if headers is None:
            continue
        try:
            value = headers.get("retry-after") or headers.get("Retry-After")
        except Exception:  # noqa: BLE001 - foreign header objects
            return None
        if value is None:
            continue
        try:
            return max(0.0, float(value))
        except (TypeError, ValueError):
            return None  # an HTTP date: rare from APIs; fall back to the class default
    return None


def stated_pause(exc: BaseException) -> float | None:
    """How long a rate-limit error says to wait: RateLimited's seconds or Retry-After."""
    if isinstance(exc, RateLimited):
        return exc.seconds
    return retry_after_header(exc)


def error_class(exc: BaseException) -> str:
    if isinstance(exc, Fail):
        return "fail"
    if isinstance(exc, RateLimited):
        return "rate_limit"
    if isinstance(exc, RetryAfter):
        return "snooze"
    if isinstance(exc, msgspec.ValidationError):
        return "validation"
    status = http_status(exc)
    if status == 429:
        return "rate_limit"
    if status in _CLIENT_STATUSES:
        return "client"
    if status is not None and (status >= 500 or status == 408):  # 408: the server timed out
        return "network"
    if isinstance(exc, TimeoutError | ConnectionError) or _looks_like_network(exc):
        return "network"
    return "unknown"


def _looks_like_network(exc: BaseException) -> bool:
    # httpx.TransportError, aiohttp.ClientConnectionError, trio.TooSlowError and kin,
    # without importing any of them.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"TransportError", "ClientConnectionError", "TooSlowError",
                         "ConnectError", "ReadTimeout", "ConnectTimeout"})


def backoff(error_class: str, attempt: int, rng: random.Random,
            base_delays: dict[str, float] | None = None) -> float:
    base = (base_delays or {}).get(error_class, BASE_DELAY_S.get(error_class, 5.0))
    # The exponent is clamped: 2 ** 1024 does not fit a float (max_attempts is unbounded).
    delay = min(base * 2.0 ** min(max(attempt - 1, 0), 64), MAX_DELAY_S)
    return delay * rng.uniform(0.75, 1.25)


def decide(exc: BaseException, attempt: int, max_attempts: int, rng: random.Random,
           base_delays: dict[str, float] | None = None) -> Decision:
    cls = error_class(exc)
    if cls == "snooze":
        assert isinstance(exc, RetryAfter)
        return Decision("snooze", cls, exc.seconds)
    if cls in _FAIL_NOW:
        return Decision("fail", cls)
    pause = stated_pause(exc) if cls == "rate_limit" else None
    if attempt >= max_attempts:
        return Decision("fail", cls, pause_s=pause)
    if pause is not None:
        return Decision("retry", cls, pause, pause_s=pause)
    return Decision("retry", cls, backoff(cls, attempt, rng, base_delays))


def timeout_decision(attempt: int, max_attempts: int, rng: random.Random) -> Decision:
    if attempt >= max_attempts:
        return Decision("fail", "timeout")
    return Decision("retry", "timeout", backoff("timeout", attempt, rng))


def summarize(exc: BaseException, limit: int = 8) -> dict[str, Any]:
    """Message and the innermost frames, small enough to keep for every attempt."""
    frames = traceback.extract_tb(exc.__traceback__)[-limit:]
    return {
        "type": type(exc).__name__,
        "message": str(exc)[:2000],
        "traceback": "".join(traceback.format_list(frames))[-4000:],
    }
