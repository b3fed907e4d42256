"""Value Structs shared by commands and replies."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

JOB_STATES = ("scheduled", "available", "running", "waiting", "completed", "failed", "cancelled")


class JobSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One job to enqueue. Unset options take the handler's declaration."""

    kind: str
    args: dict[str, Any] = {}
    queue: str | None = None
    key: str | None = None
    unique_key: str | None = None
    priority: int | None = None
    delay_s: float | None = None
    run_at: datetime | None = None
    max_attempts: int | None = None
    tags: list[str] = []
    timeout_s: float | None = None
    cost: int | None = None  # weight against the key's tokens_per_minute (e.g. tokens)


class AttemptError(msgspec.Struct, kw_only=True):
    attempt: int
    error_class: str = msgspec.field(name="class")
    message: str = ""
    type: str | None = None
    at: str | None = None
    duration_s: float | None = None
    traceback: str | None = None


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
