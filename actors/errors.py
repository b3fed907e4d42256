"""Exceptions a handler raises to steer its job (importable as `from actors import ...`)."""

from __future__ import annotations


class RetryAfter(Exception):
    """Run this job again in `seconds`; by default the attempt is not counted (a snooze).

    A snooze concerns this job only: its key is not paused and its rate is not touched.
    For a remote side that rate-limits you, raise RateLimited (or let the HTTP 429 error
    propagate), which pauses the whole key.
    """

    def __init__(self, seconds: float, reason: str = ""):
        super().__init__(reason or f"retry after {seconds:g} s")
        self.seconds = max(0.0, float(seconds))


class RateLimited(Exception):
    """The remote side rate-limited this call (what an HTTP 429 means too).

    The job's key is paused on every daemon for `seconds` (None: the remote did not say;
    the queue's `rate_limit_pause` applies) and its adaptive rate is slowed; the job
    retries after that pause (or its rate-limit backoff), as an attempt. To run this one
    job later without telling the key's limiter, raise RetryAfter instead.
    """

    def __init__(self, seconds: float | None = None, reason: str = ""):
        super().__init__(reason or ("rate limited" if seconds is None
                                    else f"rate limited for {seconds:g} s"))
        self.seconds = None if seconds is None else max(0.0, float(seconds))


class Fail(Exception):
    """Fail the job now, without retries; it stays replayable."""


class UnknownKind(Exception):
    """No handler is registered for this kind."""


class InvalidArgs(Exception):
    """Args do not fit the handler's Struct; `field` is the offending path when known."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class AwaitCallback(BaseException):  # noqa: N818 - control flow, like trio.Cancelled
    """Raised by the HTTP handler when its endpoint answered 202 {"callback": true}: the
    attempt goes on at the app, which calls back. The worker detaches the job from this
    daemon's lease, keeps it `running` (its key's slot stays held) and gives it
    `timeout_s` to be called back. A BaseException so no `except Exception` swallows it."""

    def __init__(self, timeout_s: float):
        super().__init__(f"waiting up to {timeout_s:g} s for the callback")
        self.timeout_s = timeout_s
