"""The callbacks of an HTTP handler's app (README "Handlers behind a URL"): after its
endpoint answered 202 `{"callback": true}`, the app finishes the job with one of these,
carrying the callback token from the request (`callback.token`).

Over HTTP they are `POST /v1/jobs/{id}/complete` (`/fail`, `/progress`, `/heartbeat`)
with the other fields as the body; the token is their authorization, no API token is
needed. On the socket they are commands like any other (`job_complete`, ...).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from protocol.jobs import JobId, text

CallbackToken = text(200, 1)


class _Callback(msgspec.Struct, tag_field="type", kw_only=True):
    id: Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    job_id: JobId
    token: CallbackToken  # type: ignore[valid-type]

    mutating = True


class JobComplete(_Callback, tag="job_complete"):
    """The job completed; `result` is stored as its result (at most
    limits.max_result_bytes, JSON-encoded, else the attempt fails as result_too_large)."""

    result: Any = None


class JobFail(_Callback, tag="job_fail"):
    """The attempt failed: `retryable` retries it with backoff (attempts allowing), else
    the job fails now."""

    message: text(2000) = "failed by the app"  # type: ignore[valid-type]
    retryable: bool = False


class JobProgress(_Callback, tag="job_progress"):
    """Progress (0-100) and a note; like a heartbeat, it moves the deadline."""

    pct: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    note: text(1000) | None = None  # type: ignore[valid-type]


class JobHeartbeat(_Callback, tag="job_heartbeat"):
    """The app still works on it: the deadline moves to now + the kind's callback_timeout."""


class CallbackResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: int
    state: str  # the job's state after the callback
    deadline: datetime | None = None  # progress and heartbeat: the callback's new deadline
