"""Value Structs shared by commands and replies.

Every field a client sets has its range here (msgspec.Meta), so every surface refuses
a bad value at decode with the field's path, before it reaches an actor or Postgres
(README: "Limits"). Text lengths are in characters, sized so that an index entry of
even four-byte characters stays under Postgres' btree row limit (~2.7 KB).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

# `skipped`: refused by a flow-control tool (throttle mode drop, singleton mode skip),
# kept as a finished row so list/get show it.
JOB_STATES = ("scheduled", "available", "running", "waiting", "completed", "failed", "cancelled",
              "skipped")
# A pattern, not a Literal: the refusal then spells out the valid states.
JobState = Annotated[str, msgspec.Meta(pattern=f"^({'|'.join(JOB_STATES)})$")]

# Postgres text cannot hold U+0000: refused at the edge, not by a database error.
NO_NUL = r"^[^\x00]*$"

KIND_MAX_CHARS = 200
QUEUE_MAX_CHARS = 100
KEY_MAX_CHARS = 512
UNIQUE_KEY_MAX_CHARS = 512
TAG_MAX_CHARS = 256
TAGS_MAX = 100
PRIORITY_MIN, PRIORITY_MAX = -32768, 32767  # the column is a smallint; lower runs first
MAX_ATTEMPTS_MAX = 1000
TIMEOUT_MAX_S = 365 * 86400.0  # one year
DELAY_MAX_S = 10 * 365 * 86400.0  # ten years: run_at may lie at most this far ahead
COST_MAX = 1_000_000_000
ID_MAX = 2**63 - 1  # bigint
# A W3C trace context (version 00, lower-case hex, neither id all zeros): the producer's
# span, which a job's attempt spans take as their parent (README: "Tracing"). The same
# pattern is the column's CHECK and `jobd.enqueue`'s test (migration 0018).
TRACEPARENT_PATTERN = r"^00-(?!0{32}-)[0-9a-f]{32}-(?!0{16}-)[0-9a-f]{16}-[0-9a-f]{2}$"


def text(max_chars: int, min_chars: int = 0) -> Any:
    """A NUL-free string of bounded length (characters)."""
    return Annotated[str, msgspec.Meta(min_length=min_chars, max_length=max_chars,
                                       pattern=NO_NUL)]


Kind = text(KIND_MAX_CHARS, 1)
QueueName = text(QUEUE_MAX_CHARS, 1)
Key = text(KEY_MAX_CHARS, 1)
UniqueKey = text(UNIQUE_KEY_MAX_CHARS, 1)
Tag = text(TAG_MAX_CHARS)
Tags = Annotated[list[Tag], msgspec.Meta(max_length=TAGS_MAX)]
Priority = Annotated[int, msgspec.Meta(ge=PRIORITY_MIN, le=PRIORITY_MAX)]
MaxAttempts = Annotated[int, msgspec.Meta(ge=1, le=MAX_ATTEMPTS_MAX)]
TimeoutS = Annotated[float, msgspec.Meta(gt=0, le=TIMEOUT_MAX_S)]
DelayS = Annotated[float, msgspec.Meta(ge=0, le=DELAY_MAX_S)]
Cost = Annotated[int, msgspec.Meta(ge=0, le=COST_MAX)]
JobId = Annotated[int, msgspec.Meta(ge=1, le=ID_MAX)]
Traceparent = Annotated[str, msgspec.Meta(pattern=TRACEPARENT_PATTERN)]


class JobSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One job to enqueue. Unset options take the handler's declaration.

    `args` must fit `limits.max_args_bytes` (JSON-encoded; refused as `too_large`);
    `run_at` may lie at most DELAY_MAX_S ahead (a time in the past means now).
    """

    kind: Kind
    args: dict[str, Any] = {}
    queue: QueueName | None = None
    key: Key | None = None
    unique_key: UniqueKey | None = None
    priority: Priority | None = None
    delay_s: DelayS | None = None
    run_at: datetime | None = None
    max_attempts: MaxAttempts | None = None
    tags: Tags = []
    timeout_s: TimeoutS | None = None
    cost: Cost | None = None  # weight against the key's tokens_per_minute (e.g. tokens)
    traceparent: Traceparent | None = None  # the producer's span (W3C), parent of the attempts


class AttemptError(msgspec.Struct, kw_only=True):
    attempt: int
    error_class: str = msgspec.field(name="class")
    message: str = ""
    type: str | None = None
    at: str | None = None
    duration_s: float | None = None
    traceback: str | None = None
    # The attempt's span, when it was traced (README: "Tracing"): the next attempt links to it.
    trace_id: str | None = None
    span_id: str | None = None


class JobView(msgspec.Struct, kw_only=True):
    id: int
    kind: str
    queue: str
    key: str | None
    args: Any
    state: str
    attempt: int
    max_attempts: int
    priority: int
    unique_key: str | None
    tags: list[str]
    progress: float | None
    progress_note: str | None
    result: Any
    errors: list[AttemptError]
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lease_owner: str | None
    cancel_requested: bool
    # List views leave out args/result/errors (and shorten progress_note) larger than
    # `limits.list_field_bytes`; the names of the fields left out. `get` shows them whole.
    truncated: list[str] = []
    event_id: int | None = None  # the event that started this job (README: "Events")
    # An HTTP handler's attempt whose endpoint answered 202: still `running` (its key's
    # slot held) on no daemon, until the app calls back or this deadline passes.
    callback_deadline: datetime | None = None


class QueueCounts(msgspec.Struct, kw_only=True):
    queue: str
    counts: dict[str, int]
    running_here: int = 0
    concurrency: int | None = None
    paused: bool = False
    paused_keys: list[str] = []


class DaemonView(msgspec.Struct, kw_only=True):
    id: str
    region: str
    host: str
    pid: int
    version: str
    started_at: datetime
    heartbeat_at: datetime
    draining: bool
    status: str


class KeyStats(msgspec.Struct, kw_only=True):
    """One flow-control key: what runs, what waits, its limits and remote state."""

    queue: str
    key: str
    running: int
    queued: int
    concurrency_limit: int | None = None
    rate_limit: float | None = None  # starts per second, as configured
    effective_rate: float | None = None  # after adaptive back-off
    tokens_per_minute: float | None = None
    paused_until: datetime | None = None
    breaker: str = "closed"  # closed | open | half_open
    consecutive_failures: int = 0
