"""Exceptions a handler raises to steer its job (importable as `from actors import ...`)."""

from __future__ import annotations


class RetryAfter(Exception):
    """Run this job again in `seconds`; by default the attempt is not counted (a snooze).

    Raise it when a remote side asks you to come back later (a 429 with Retry-After).
    """

    def __init__(self, seconds: float, reason: str = ""):
        super().__init__(reason or f"retry after {seconds:g} s")
        self.seconds = max(0.0, float(seconds))


class Fail(Exception):
    """Fail the job now, without retries; it stays replayable."""


class UnknownKind(Exception):
    """No handler is registered for this kind."""


class InvalidArgs(Exception):
    """Args do not fit the handler's Struct; `field` is the offending path when known."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field
