"""What the actors need from the outside world, and the rows they exchange with it.

`daemon.store.PgStore` implements `Store` (and opens `LeaderSession`s);
`daemon.metrics` implements `Observer`. Actors depend on these Protocols only, never
on SQL or asyncpg.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol

import msgspec
import trio

from actors.flow import FlowLimits
from actors.tools import Tools
from protocol.commands import Filtered


class StoreUnavailable(Exception):
    """The database cannot be reached; the caller backs off and tries again."""


class Conflict(StoreUnavailable):
    """A deadlock or serialization failure: nothing is wrong, the same call may be retried."""


class ValueRejected(Exception):
    """The database refused a value from the request (an id past bigint, a NUL byte)."""


class LeaseLost(Exception):
    """A write fenced by the lease token matched no running job: this attempt was rescued
    or cancelled (or has finished), and what it wrote was not stored."""


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
    cost: int = 1  # weight against a key's tokens_per_minute
    traceparent: str | None = None  # W3C, validated (protocol.jobs.TRACEPARENT_PATTERN)
    # Set (maybe empty) for a kind with flow-control tools (actors/tools.py): the row goes
    # through jobd.enqueue_tools; the keys its handler's functions computed.
    tool_keys: dict[str, str] | None = None


class StepRow(msgspec.Struct):
    """One finished step to store, fenced by its attempt's lease token."""

    job_id: int
    token: int
    name: str
    result: str  # JSON
    attempts: int
    duration_s: float


class Enqueued(msgspec.Struct):
    id: int
    created: bool
    # What a flow-control tool did (jobd.enqueue_tools): created | debounced | replaced |
    # batched | duplicate | skipped_throttle | skipped_singleton; None for plain kinds.
    outcome: str | None = None


class Claimed(msgspec.Struct):
    """A job this daemon now runs; `lease_token` fences its finish.

    Positional in the order of the store's claimed columns, so a row maps in one call.
    """

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
    # A workflow's stored steps, JSON [[name, result, done], ...]; None: not known, the
    # first step loads them (a job without steps, or one whose steps were not marked).
    steps: str | None = None
    # The producer's W3C trace context (its enqueue's, or the spawning attempt's), the
    # parent of this attempt's span when tracing is on.
    traceparent: str | None = None


class Outcome(msgspec.Struct, kw_only=True):
    """How one attempt ended, as the completer writes it."""

    id: int
    token: int
    state: str  # completed | failed | cancelled | available | scheduled
    result: str | None = None  # JSON
    delay_s: float | None = None  # next run, for retries
    error: str | None = None  # JSON object appended to the job's errors
    refund: int = 0  # 1 when the attempt does not count (a snooze)
    flow: str | None = None  # ok | fail | rate_limited: what the key's remote side did
    pause_s: float | None = None  # pause the whole key this long (429 / RetryAfter)
    # Workflow bookkeeping written by the same statement, fenced by the same token: the
    # sleeps and waits this run began (a JSON array, actors/workflow_context.py
    # `pending`), and what a suspension waits on (JSON; see FINISH_MANY).
    steps: str | None = None
    waiting_on: str | None = None


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


class ScheduleDef(msgspec.Struct, kw_only=True):
    """A schedule's definition, validated; what `put_schedule` writes."""

    name: str
    kind: str
    cron: str | None
    every_s: float | None
    tz: str
    args: str  # JSON
    queue: str | None
    key: str | None
    priority: int | None
    max_attempts: int | None
    timeout_s: float | None
    tags: list[str]
    jitter_s: float
    missed: str
    missed_limit: int
    grace_s: float
    paused: bool = False
    source: str = "runtime"  # "config" | "runtime"


class ScheduleRow(ScheduleDef, kw_only=True):
    """A schedule as stored; `handled_until` is its firing watermark."""

    revision: int
    handled_until: datetime
    last_fire_at: datetime | None
    last_job_id: int | None
    created_at: datetime
    updated_at: datetime


class FireTarget(msgspec.Struct):
    """A schedule to fire at the `revision` it was planned from; the watermark moves to
    `advance_to` (None: a manual trigger, which leaves it)."""

    name: str
    revision: int
    advance_to: datetime | None


class Occurrence(msgspec.Struct, kw_only=True):
    """One occurrence to fire, with its job; the job runs at fire_at + delay_s."""

    schedule: str
    fire_at: datetime
    manual: bool = False
    job: NewJob


class Fired(msgspec.Struct):
    schedule: str
    fire_at: datetime
    job_id: int


class Subscription(msgspec.Struct, kw_only=True, frozen=True):
    """One (event, kind, action) a handler declares (actors/events.py), as Postgres keeps
    it: "start" makes a job of `kind` from an event whose data contains `match`;
    "cancel" cancels the kind's unfinished jobs whose args equal the data on `fields`."""

    event: str
    kind: str
    action: str
    match: dict[str, Any] = {}
    fields: list[str] = []
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 3
    timeout_s: float | None = None
    key_path: list[str] | None = None  # the job's key: the data's value at this path


class EventToSend(msgspec.Struct):
    name: str
    data: str  # a JSON object
    key: str | None = None  # the sender's idempotency key


class EventSent(msgspec.Struct, kw_only=True):
    id: int  # the first event's, for a repeat of its idempotency key
    created: bool
    started: list[int]
    started_kinds: list[str]
    cancelled: list[int]
    woken: list[int]


class Transaction(Protocol):
    """SQL on jobd's pool inside one transaction, for handlers (`ctx.transaction()`)."""

    async def execute(self, sql: str, *args: Any) -> str: ...
    async def fetch(self, sql: str, *args: Any) -> list[Any]: ...
    async def fetchrow(self, sql: str, *args: Any) -> Any: ...
    async def fetchval(self, sql: str, *args: Any) -> Any: ...
    async def finish(self, outcome: Outcome) -> bool: ...


class LeaderSession(Protocol):
    """One dedicated connection that asks for, then holds, the database-wide leader lock.

    The lock is the session's: Postgres drops it when the connection ends, however it
    ends, so a dead daemon never keeps the leadership (`actors.services.peer`).
    """

    async def try_lead(self) -> bool:
        """Take the lock if no session holds it; True if this session holds it now."""
        ...

    async def ping(self) -> None:
        """One round trip; raises StoreUnavailable once the connection (and lock) is gone."""
        ...


class GaugeSession(LeaderSession, Protocol):
    """The metrics leader's own connection: its advisory lock is the leadership, and the
    database-derived gauges are read on it."""

    async def queue_gauges(
        self, now: datetime | None = None
    ) -> tuple[list[tuple[str, str, int]], list[tuple[str, float]]]: ...
    async def key_gauges(self, limit: int) -> list[dict[str, Any]]: ...


class StepStore(Protocol):
    """What a running workflow needs from the store (`actors/workflow_context.py`); the
    daemon's store has it as part of `Store`, tests may give an in-memory one."""

    async def load_steps(self, job_id: int) -> list[tuple[str, str | None, bool]]: ...
    async def save_step(self, job_id: int, token: int, name: str, result: str, attempts: int,
                        duration_s: float) -> str: ...
    async def save_step_error(self, job_id: int, name: str, error: str, attempts: int) -> None: ...
    async def begin_sleep(self, job_id: int, name: str, until: float) -> float: ...
    async def spawn_children(self, job_id: int, name: str, jobs: list[NewJob]) -> list[int]: ...
    async def gather_children(self, job_id: int, token: int, waiting_on: str,
                              ids: list[int]) -> list[dict[str, Any]]: ...
    async def begin_wait(self, job_id: int, token: int, step: str, event: str, match: str,
                         timeout_s: float | None) -> tuple[str, str | None, float]: ...
    async def get_job(self, job_id: int) -> dict[str, Any] | None: ...


class Delivery(msgspec.Struct):
    """A claimed webhook outbox row: one attempt to POST `payload` (JSON text)."""

    id: int
    webhook: str
    event: str
    job_id: int
    payload: str
    attempts: int  # this attempt's number (it fences the record)
    age_s: float  # since its retry window began


class DeliveryOutcome(msgspec.Struct, kw_only=True):
    """One attempt's end: `state` delivered, pending (again after `delay_s`) or failed."""

    id: int
    attempts: int
    state: str
    delay_s: float = 0.0
    status: int | None = None  # the receiver's HTTP status; None: no response
    error: str | None = None


class WebhookStore(Protocol):
    """The completion webhooks' outbox (`actors/services/courier.py`, the control plane)."""

    async def sync_webhooks(self, daemon_id: str, declared: list[dict[str, Any]]) -> None: ...
    async def claim_deliveries(self, daemon_id: str, wanted: dict[str, int], lease_s: float,
                               now: datetime | None = None) -> list[Delivery]: ...
    async def next_delivery_due(self, webhooks: list[str],
                                now: datetime | None = None) -> float | None: ...
    async def record_deliveries(self, outcomes: list[DeliveryOutcome],
                                now: datetime | None = None) -> None: ...
    async def list_deliveries(self, state: str | None, webhook: str | None,
                              cursor: int | None, limit: int) -> list[dict[str, Any]]: ...
    async def replay_deliveries(self, ids: list[int], failed: bool,
                                now: datetime | None = None) -> list[tuple[int, str]]: ...
    async def prune_deliveries(self, ages: dict[str, tuple[float, float]], limit: int,
                               others_max_age_s: float, now: datetime | None = None) -> int: ...
    async def delivery_backlog(self, webhooks: list[str], now: datetime | None = None
                               ) -> dict[str, tuple[int, float]]: ...


class Store(StepStore, WebhookStore, Protocol):
    """Every method `daemon.store.PgStore` has, by subject; callers depend on this only.

    `tests/daemon/test_store_port.py` checks PgStore against it (signatures) and that
    every `store.X` in actors/ and daemon/ is here; mypy checks PgStore (`_: type[Store]`).
    """

    # -- life and health (the daemon; /readyz; the reaper's rescue hold)
    observer: Observer
    unavailable_at: float | None  # time.monotonic() of the last call that found it down
    renewed_at: float | None  # time.monotonic() of the last heartbeat that renewed leases

    @property
    def healthy(self) -> bool: ...
    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def migrations_current(self) -> bool: ...

    # -- jobs
    async def enqueue_many(self, jobs: list[NewJob]) -> list[Enqueued]: ...
    async def enqueue_children(self, parent_id: int, jobs: list[NewJob]) -> list[Enqueued]: ...
    async def claim(
        self, queue: str, limit: int, owner: str, lease_s: float, kinds: list[str],
        now: datetime | None = None, paused_keys: list[str] | None = None,
        limits: FlowLimits | None = None,
    ) -> list[Claimed]: ...
    async def next_due(
        self, queue: str, kinds: list[str], paused_keys: list[str] | None = None
    ) -> float | None: ...
    async def finish_many(
        self, outcomes: list[Outcome],
        key_failures: Callable[[str, str, int], None] | None = None,
    ) -> set[int]: ...
    async def write_progress(self, updates: list[ProgressUpdate], lease_s: float) -> None: ...
    async def cancel(self, job_id: int) -> tuple[str, str] | None: ...
    async def running_cancel_requests(self, daemon_id: str) -> list[int]: ...
    async def stats(self, finished: bool = True) -> list[tuple[str, str, int]]: ...
    async def promote_due(self, limit: int, now: datetime | None = None) -> int: ...
    async def prune_finished(
        self, state: str, max_age_s: float, max_count: int, limit: int,
        now: datetime | None = None,
    ) -> int: ...

    # -- daemons and leases
    async def register_daemon(
        self, daemon_id: str, region: str, host: str, pid: int, version: str
    ) -> None: ...
    async def heartbeat(
        self, daemon_id: str, lease_s: float, status: str, draining: bool,
        now: datetime | None = None, running: list[tuple[int, int]] | None = None,
    ) -> list[tuple[int, int]]: ...
    async def set_daemon_queues(self, daemon_id: str, queues: list[str]) -> None: ...
    async def live_queues(self, live_s: float) -> list[str]: ...
    async def put_settings(self, settings: dict[str, Any]) -> None: ...
    async def deregister_daemon(self, daemon_id: str) -> None: ...
    async def list_daemons(self) -> list[dict[str, Any]]: ...
    async def forget_dead_daemons(self, after_s: float, now: datetime | None = None) -> int: ...
    async def rescue_expired(self, limit: int, now: datetime | None = None) -> list[Swept]: ...
    async def expire_overdue(
        self, limit: int, grace_s: float, now: datetime | None = None
    ) -> list[Swept]: ...

    # -- flow control
    async def key_stats(self, queue: str | None, limit: int = 50) -> list[dict[str, Any]]: ...
    async def age_priorities(
        self, queue: str, aging_s: float, floor: int, limit: int, now: datetime | None = None
    ) -> int: ...
    async def prune_idle_keys(
        self, limit: int, idle_s: float, forget_s: float, now: datetime | None = None
    ) -> int: ...

    # -- the control plane (`where` is a protocol.commands.Filtered command)
    async def list_jobs(
        self, where: Filtered, cursor: int | None, limit: int, field_bytes: int = 4096
    ) -> list[dict[str, Any]]: ...
    async def summarize(self, where: Filtered) -> dict[str, int]: ...
    async def cancel_matching(self, where: Filtered, dry_run: bool) -> tuple[int, int]: ...
    async def retry_matching(self, where: Filtered, dry_run: bool) -> tuple[int, int]: ...
    async def delete_matching(self, where: Filtered, dry_run: bool) -> tuple[int, int]: ...
    async def replay_matching(self, where: Filtered, dry_run: bool) -> tuple[int, list[int]]: ...
    async def pause(self, queue: str, key: str | None) -> None: ...
    async def resume(self, queue: str, key: str | None) -> None: ...
    async def list_pauses(self) -> list[tuple[str, str]]: ...
    async def inspect_run(self, job_id: int, field_bytes: int, children: int,
                          steps: int) -> dict[str, Any] | None: ...
    async def activity(self, bucket_s: int, buckets: int) -> dict[str, Any]: ...

    # -- schedules (the scheduler, and the control actor's schedule commands)
    async def list_schedules(
        self, now: datetime | None = None
    ) -> tuple[datetime, list[ScheduleRow]]: ...
    async def get_schedule(
        self, name: str, now: datetime | None = None
    ) -> tuple[datetime, ScheduleRow] | None: ...
    async def put_schedule(
        self, schedule: ScheduleDef, *, replace: bool, now: datetime | None = None
    ) -> ScheduleRow | None: ...
    async def delete_schedule(self, name: str) -> bool: ...
    async def set_schedule_paused(
        self, name: str, paused: bool, now: datetime | None = None
    ) -> ScheduleRow | None: ...
    async def fire_schedules(
        self, targets: list[FireTarget], occurrences: list[Occurrence],
        now: datetime | None = None,
    ) -> tuple[list[Fired], set[str]]: ...
    async def prune_schedule_fires(
        self, keep_s: float, limit: int, now: datetime | None = None
    ) -> int: ...

    # -- workflows (the steps are StepStore's, above; events; the reaper's safety net)
    async def save_steps(self, rows: list[StepRow]) -> list[str | None]: ...
    async def send_event(self, name: str, data: str) -> tuple[int, list[int]]: ...
    async def send_events(self, events: list[EventToSend]) -> list[EventSent]: ...
    async def sync_subscriptions(self, daemon_id: str, subscriptions: list[Subscription],
                                 kinds: list[str], live_s: float) -> tuple[int, int]: ...
    async def list_events(self, name: str | None, cursor: int | None, limit: int,
                          field_bytes: int) -> list[dict[str, Any]]: ...
    async def prune_event_keys(self, limit: int, now: datetime | None = None) -> int: ...
    async def list_subscriptions(self) -> list[dict[str, Any]]: ...
    async def wake_waiting(self, limit: int) -> list[int]: ...
    async def prune_events(self, max_age_s: float, limit: int,
                           now: datetime | None = None) -> int: ...
    async def register_failure_hooks(self, kinds: list[str]) -> None: ...
    # Each kind's flow-control tools (actors/tools.Tools), None for a kind without.
    async def sync_kind_tools(self, declared: dict[str, Tools | None]) -> None: ...
    async def workflow_details(self, job_id: int) -> tuple[str | None, str, str]: ...

    # -- an HTTP handler's callbacks (actors/services/callbacks.py)
    async def callback_target(self, job_id: int) -> dict[str, Any] | None: ...
    async def renew_callback(self, job_id: int, token: int, pct: float | None,
                             note: str | None, extend_s: float) -> dict[str, Any] | None: ...

    # -- connections of their own
    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...
    def listen(
        self, channels: list[str], send: trio.MemorySendChannel[tuple[str, str]],
        on_full: Callable[[str, str], None],
    ) -> AbstractAsyncContextManager[None]:
        """Notifications into `send` as (channel, payload), ("<channel>", "") after each
        (re)connect; one that finds `send` full goes to `on_full` instead."""
        ...
    def metrics_session(self) -> AbstractAsyncContextManager[GaugeSession]: ...


class Observer(Protocol):
    """Metrics hooks; every method must be cheap and never raise."""

    def job_started(self, queue: str, kind: str, wait_s: float) -> None: ...
    def job_finished(self, queue: str, kind: str, outcome: str, run_s: float) -> None: ...
    def jobs_enqueued(self, queue: str, kind: str, n: int) -> None: ...
    def events_sent(self, received: int, deduplicated: int, started: dict[str, int]) -> None: ...
    def jobs_rescued(self, queue: str, kind: str, n: int) -> None: ...
    def error_classified(self, queue: str, error_class: str) -> None: ...
    def actor_restarted(self, actor: str) -> None: ...
    def maintenance_error(self, actor: str, step: str) -> None: ...
    def claim_batch(self, queue: str, size: int) -> None: ...
    def db_round_trip(self, operation: str, seconds: float) -> None: ...
    def notification_dropped(self, channel: str) -> None: ...
    def http_request(self, kind: str, status_class: str, outcome: str,
                     seconds: float) -> None: ...
    def key_paused(self, queue: str, key: str) -> None: ...
    def breaker_opened(self, queue: str, key: str) -> None: ...
    # Flow-control tools (actors/tools.py): what enqueue_tools did to n enqueues of a
    # kind (debounced, replaced, skipped_throttle, ...), and a batch's first attempt.
    def flow_tool_enqueued(self, kind: str, outcome: str, n: int) -> None: ...
    def batch_started(self, kind: str, size: int) -> None: ...
    def key_snapshot(self, queue: str, running: dict[str, int], rate: dict[str, float],
                     breaker_open: dict[str, bool] | None = None) -> None: ...


class WebhookObserver(Protocol):
    """The courier's metrics hooks (daemon/metrics/webhooks.py); cheap, never raise."""

    def webhook_attempt(self, webhook: str, state: str, reason: str, seconds: float) -> None:
        """One POST ended: `state` delivered, pending (a retry, for `reason`) or failed."""
    def webhook_backlog(self, backlog: dict[str, tuple[int, float]]) -> None:
        """Pending rows and the oldest one's age, per webhook this daemon declares."""


class NullObserver:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return _ignore


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None

