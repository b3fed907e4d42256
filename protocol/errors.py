"""Stable error codes: the same on the socket, over HTTP and from `jobctl`."""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.StrEnum):
    BAD_JSON = "bad_json"
    BAD_REQUEST = "bad_request"
    UNKNOWN_COMMAND = "unknown_command"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    HANDSHAKE_REQUIRED = "handshake_required"
    FRAME_TOO_LONG = "frame_too_long"
    UNKNOWN_KIND = "unknown_kind"
    INVALID_ARGS = "invalid_args"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    UNAUTHORIZED = "unauthorized"
    UNAVAILABLE = "unavailable"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    TOO_LARGE = "too_large"  # a value over a configured size limit (args, key, ...)
    INTERNAL = "internal"


class JobdError(Exception):
    """An error reply from jobd (raised by the client), or one to send (in the daemon)."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | str | None = None,
                 details: dict[str, Any] | None = None):
        super().__init__(message)
        if code is not None:
            self.code = ErrorCode(code) if code in ErrorCode._value2member_map_ else code  # type: ignore[assignment]
        self.message = message
        self.details = details or {}


class NotFound(JobdError):
    code = ErrorCode.NOT_FOUND


class BadRequest(JobdError):
    code = ErrorCode.BAD_REQUEST


class Unavailable(JobdError):
    code = ErrorCode.UNAVAILABLE


class ConnectionFailed(JobdError):
    """The client could not reach the daemon at all."""

    code = ErrorCode.UNAVAILABLE
