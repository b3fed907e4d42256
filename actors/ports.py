"""What the actors need from the outside world, and the rows they exchange with it.

`daemon.store.PgStore` implements `Store`; `daemon.metrics` implements `Observer`.
Actors depend on these Protocols only, never on SQL or asyncpg.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol

import msgspec


class StoreUnavailable(Exception):
    """The database cannot be reached; the caller backs off and tries again."""


class NewJob(msgspec.Struct, kw_only=True):
    """One row to enqueue; args are already validated and JSON-encoded."""

    kind: str
    args: str = "{}"
    queue: str = "default"
    key: str | None = None
    unique_key: str | None = None
    priority: int = 0
    delay_s: float | None = None
    max_attempts: int = 3
    tags: list[str] = []
    timeout_s: float | None = None


class Enqueued(msgspec.Struct):
    id: int
    created: bool


class Claimed(msgspec.Struct, kw_only=True):
    """A job this daemon now runs; `lease_token` fences its finish."""

    id: int
    queue: str
    kind: str
    args: str
    key: str | None
    priority: int
    attempt: int
    max_attempts: int
    lease_token: int
    timeout_s: float | None
    tags: list[str]
    errors: str
    unique_key: str | None
    run_at: datetime
    created_at: datetime
    started_at: datetime


class Outcome(msgspec.Struct, kw_only=True):
    """How one attempt ended, as the completer writes it."""

    id: int
    token: int
    state: str  # completed | failed | cancelled | available | scheduled
    result: str | None = None  # JSON
    delay_s: float | None = None  # next run, for retries
    error: str | None = None  # JSON object appended to the job's errors
    refund: int = 0  # 1 when the attempt does not count (a snooze)


class ProgressUpdate(msgspec.Struct):
    id: int
    token: int
    pct: float | None
    note: str | None


class Swept(msgspec.Struct):
    id: int
    queue: str
    kind: str
    state: str


class Transaction(Protocol):
    """SQL on jobd's pool inside one transaction, for handlers (`ctx.transaction()`)."""

    async def execute(self, sql: str, *args: Any) -> str: ...
    async def fetch(self, sql: str, *args: Any) -> list[Any]: ...
    async def fetchrow(self, sql: str, *args: Any) -> Any: ...
    async def fetchval(self, sql: str, *args: Any) -> Any: ...
    async def finish(self, outcome: Outcome) -> bool: ...


class Store(Protocol):
    async def enqueue_many(self, jobs: list[NewJob]) -> list[Enqueued]: ...
    async def claim(
        self, queue: str, limit: int, owner: str, lease_s: float, kinds: list[str],
        now: datetime | None = None, paused_keys: list[str] | None = None,
    ) -> list[Claimed]: ...
    async def next_due(self, queue: str, kinds: list[str]) -> float | None: ...
    async def finish_many(self, outcomes: list[Outcome]) -> set[int]: ...
    async def write_progress(self, updates: list[ProgressUpdate], lease_s: float) -> None: ...
    async def heartbeat(
        self, daemon_id: str, lease_s: float, status: str, draining: bool,
        now: datetime | None = None,
    ) -> int: ...
    async def running_cancel_requests(self, daemon_id: str) -> list[int]: ...
    async def cancel(self, job_id: int) -> tuple[str, str] | None: ...
    async def get_job(self, job_id: int) -> dict[str, Any] | None: ...
    async def stats(self) -> list[tuple[str, str, int]]: ...
    async def list_daemons(self) -> list[dict[str, Any]]: ...
    async def rescue_expired(self, limit: int, now: datetime | None = None) -> list[Swept]: ...
    async def expire_overdue(
        self, limit: int, grace_s: float, now: datetime | None = None
    ) -> list[Swept]: ...
    async def promote_due(self, limit: int, now: datetime | None = None) -> int: ...
    async def prune_finished(
        self, state: str, max_age_s: float, max_count: int, limit: int,
        now: datetime | None = None,
    ) -> int: ...
    async def forget_dead_daemons(self, after_s: float, now: datetime | None = None) -> int: ...
    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...
    def listen(
        self, channels: list[str], on_notify: Callable[[str, str], None]
    ) -> AbstractAsyncContextManager[None]: ...


class Observer(Protocol):
    """Metrics hooks; every method must be cheap and never raise."""

    def job_started(self, queue: str, kind: str, wait_s: float) -> None: ...
    def job_finished(self, queue: str, kind: str, outcome: str, run_s: float) -> None: ...
    def jobs_enqueued(self, queue: str, kind: str, n: int) -> None: ...
    def jobs_rescued(self, queue: str, kind: str, n: int) -> None: ...
    def error_classified(self, queue: str, error_class: str) -> None: ...
    def actor_restarted(self, actor: str) -> None: ...
    def claim_batch(self, queue: str, size: int) -> None: ...
    def db_round_trip(self, operation: str, seconds: float) -> None: ...


class NullObserver:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return _ignore


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None

