"""The config file's tables as Structs, each field with its default as a file would
write it. Durations decode into `Seconds` and rates into `PerSecond` (daemon/config/
units.py), so every reader gets a float; what one field's type cannot say is checked
in daemon/config/checks.py.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from actors.flow import FlowLimits, KeyLimits
from daemon.config.units import PerSecond, Seconds, seconds
from protocol.jobs import MaxAttempts, Priority
from protocol.schedules import ScheduleSpec

_Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")]
# A key's limits reach Postgres as the bigint and integer fields of jobd.flow_limit: a
# value past what they hold would fail every claim of the queue, so it fails here.
_KeyConcurrency = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]
_BreakerFailures = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    def __post_init__(self) -> None:
        # Seconds and PerSecond exist to decode "30s" and "5/s"; once decoded they become
        # plain floats, which every encoder (msgspec, asyncpg) and every message takes.
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if type(value) in (Seconds, PerSecond):
                setattr(self, name, float(value))


class Database(_Strict):
    url: str | None = None
    pool_min: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2
    pool_max: Annotated[int, msgspec.Meta(ge=1, le=200)] = 10
    timeout: Seconds = seconds("30s")


class Control(_Strict):
    socket: str | None = None  # default: <state dir>/jobd.sock
    socket_group: str | None = None
    # "127.0.0.1:8080", "unix:/path", or a list of them; unset = no HTTP server
    http: str | list[str] | None = None
    http_graceful_timeout: Seconds = seconds("10s")  # in-flight requests may finish this long
    token_file: str | None = None
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 256
    # HTTP bounds (README: "Limits"): open connections (more are answered 503 and
    # closed), the time a request body may take to arrive, the time a client may take
    # to read a response write, and how long an idle keep-alive (or a connection that
    # has not sent its request headers yet) is kept.
    http_max_connections: Annotated[int, msgspec.Meta(ge=1)] = 256
    http_read_timeout: Seconds = seconds("30s")
    http_write_timeout: Seconds = seconds("30s")
    http_keep_alive: Seconds = seconds("5s")


class Dashboard(_Strict):
    """The web dashboard at /ui/ on the `control.http` listeners (README: "Dashboard")."""

    enabled: bool = True
    # A second token that signs in read-only (pages, no actions); the API token
    # (control.token_file) signs in with the right to act.
    read_token_file: str | None = None
    session_lifetime: Seconds = seconds("12h")  # 1m .. 30d (checks.py)
    refresh: Seconds = seconds("2s")  # live parts poll this often; 500ms .. 1h


class Log(_Strict):
    level: Annotated[str, msgspec.Meta(pattern=r"^(debug|info|warning|error)$")] = "info"
    format: Annotated[str, msgspec.Meta(pattern=r"^(auto|json|human)$")] = "auto"


class Handlers(_Strict):
    modules: list[str] = []
    paths: list[str] = []  # prepended to sys.path before importing, relative to the file
    # A reload whose re-import takes longer is refused (the import is abandoned).
    import_timeout: Seconds = seconds("20s")


class KeyOverrides(_Strict):
    """Per-key overrides of the queue's key limits (`[queues.crawl.keys.slow]`)."""

    key_concurrency: _KeyConcurrency | None = None
    rate: PerSecond | None = None
    burst: Annotated[float, msgspec.Meta(gt=0)] | None = None
    tokens_per_minute: Annotated[float, msgspec.Meta(gt=0)] | None = None
    adaptive: bool | None = None
    breaker_failures: _BreakerFailures | None = None
    breaker_cooldown: Seconds | None = None


class Queue(_Strict):
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 10
    timeout: Seconds | None = None  # per-attempt default for kinds that set none
    max_attempts: MaxAttempts | None = None
    claim_batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 200
    # Flow control, enforced in Postgres across every daemon (README: "Flow control").
    key_concurrency: _KeyConcurrency | None = None
    rate: PerSecond | None = None  # per key
    burst: Annotated[float, msgspec.Meta(gt=0)] | None = None
    tokens_per_minute: Annotated[float, msgspec.Meta(gt=0)] | None = None  # per key, by job cost
    queue_rate: PerSecond | None = None  # the whole queue
    queue_burst: Annotated[float, msgspec.Meta(gt=0)] | None = None
    adaptive: bool = False
    breaker_failures: _BreakerFailures | None = None
    breaker_cooldown: Seconds = seconds("30s")
    # A rate limit that does not say how long (a 429 without Retry-After, RateLimited())
    # pauses the key this long.
    rate_limit_pause: Seconds = seconds("30s")
    aging: Seconds | None = None  # waiting this long moves a job one priority step up
    aging_floor: Priority = 0
    keys: dict[str, KeyOverrides] = {}

    def flow_limits(self) -> FlowLimits | None:
        """The limits jobd.claim_flow applies, or None when the queue has none."""
        default = KeyLimits(
            concurrency=self.key_concurrency, rate=self.rate, burst=self.burst,
            tpm=self.tokens_per_minute, adaptive=self.adaptive or None,
            breaker_failures=self.breaker_failures,
            # The queue's cooldown counts only with its own breaker: a key's breaker
            # without a cooldown of its own waits the SQL's default.
            breaker_cooldown_s=float(self.breaker_cooldown) if self.breaker_failures else None)
        keys = {name: KeyLimits(
                    concurrency=k.key_concurrency, rate=k.rate, burst=k.burst,
                    tpm=k.tokens_per_minute, adaptive=k.adaptive,
                    breaker_failures=k.breaker_failures,
                    breaker_cooldown_s=k.breaker_cooldown)
                for name, k in self.keys.items()}
        unlimited = KeyLimits()
        if default == unlimited and all(k == unlimited for k in keys.values()) \
                and self.queue_rate is None:
            return None
        return FlowLimits(
            default=default, keys=keys, rate_limit_pause_s=float(self.rate_limit_pause),
            queue_rate=self.queue_rate,
            queue_burst=self.queue_burst if self.queue_rate is not None else None)

    def fastest_rate(self) -> float | None:
        """Events per second of the quickest bucket: how often a limited claim rechecks."""
        rates: list[float] = [r for r in (self.rate, self.queue_rate) if r is not None]
        rates += [k.rate for k in self.keys.values() if k.rate is not None]
        rates += [t / 60 for t in [self.tokens_per_minute] if t]
        return max(rates) if rates else None



class Retention(_Strict):
    completed_max_age: Seconds = seconds("24h")
    completed_max_count: Annotated[int, msgspec.Meta(ge=0)] = 1000
    failed_max_age: Seconds = seconds("7d")
    failed_max_count: Annotated[int, msgspec.Meta(ge=0)] = 100_000
    cancelled_max_age: Seconds = seconds("7d")
    cancelled_max_count: Annotated[int, msgspec.Meta(ge=0)] = 100_000
    # Workflow events (signals) older than this go, unless a live waiter may still need one.
    events_max_age: Seconds = seconds("7d")


class Jobs(_Strict):
    lease: Seconds = seconds("30s")  # renewed every lease/3 while the daemon lives
    poll_interval: Seconds = seconds("2s")  # fallback when NOTIFY is lost
    timeout_grace: Seconds = seconds("60s")  # reaper's margin past a job's own timeout
    reaper_interval: Seconds = seconds("5s")
    progress_every_items: Annotated[int, msgspec.Meta(ge=1)] = 100
    progress_every: Seconds = seconds("2s")
    snooze_burns_attempt: bool = False
    # An attempt's timeout when neither its kind nor its queue sets one ("0s": none).
    max_runtime: Seconds = seconds("1h")
    retention: Retention = msgspec.field(default_factory=Retention)


class Metrics(_Strict):
    leader_interval: Seconds = seconds("5s")  # queue gauges: leader refresh, others retry the lock
    key_series_limit: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 50  # per queue
    keys: list[str] = []  # always get their own `key` label, beyond the limit


class Daemon(_Strict):
    drain_grace: Seconds = seconds("30s")
    heartbeat: Seconds = seconds("5s")
    # A task step holding the event loop this long logs a warning naming the handler.
    loop_lag_warning: Seconds = seconds("1s")


class Tracing(_Strict):
    """OpenTelemetry spans of attempts and steps (README: "Tracing"), off by default."""

    enabled: bool = False
    # OTLP/HTTP (protobuf) traces endpoint; needs the `otlp` extra.
    endpoint: Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s\x00]+$",
                                          max_length=2048)] = "http://127.0.0.1:4318/v1/traces"
    # Share of traces kept, 0 to 1, for traces that start here; a producer's traceparent
    # decides for its own (its sampled flag).
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    service_name: Annotated[str, msgspec.Meta(min_length=1, max_length=200,
                                              pattern=r"^[^\x00]+$")] = "jobd"


_MiB = 1 << 20


class Limits(_Strict):
    """Sizes every surface enforces alike (README: "Limits").

    A request frame (socket line or HTTP body) must fit the largest args plus the
    command around them, so `max_frame_bytes` is checked to exceed `max_args_bytes`.
    """

    max_args_bytes: Annotated[int, msgspec.Meta(ge=1024, le=256 * _MiB)] = _MiB
    max_result_bytes: Annotated[int, msgspec.Meta(ge=1024, le=256 * _MiB)] = _MiB
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=4096, le=512 * _MiB)] = 2 * _MiB
    # List views (list, watch of many) shorten args/result/errors above this and say so.
    list_field_bytes: Annotated[int, msgspec.Meta(ge=64, le=_MiB)] = 4096


class HttpKind(_Strict):
    """A kind whose handler is a URL (`[http.kinds."predict.session"]`, README "Handlers
    behind a URL"). The secret is read at load and on a reload, never kept here."""

    url: str
    queue: _Name = "default"
    timeout: Seconds = seconds("60s")  # one request, answer included
    # After a 202 {"callback": true}: how long the app has to call back; each progress
    # or heartbeat callback moves the deadline this far from then.
    callback_timeout: Seconds = seconds("30m")
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    priority: Annotated[int, msgspec.Meta(ge=-32768, le=32767)] = 0
    key: str | None = None  # a top-level args field, or a JSON pointer ("/model/name")
    secret_file: str | None = None  # relative to the config file
    secret_credential: str | None = None  # $CREDENTIALS_DIRECTORY/<name> (systemd)
    args_schema: dict[str, Any] | None = None  # a JSON Schema the args must meet


class Http(_Strict):
    """Outbound requests (HTTP handlers, webhooks). URLs come only from this file."""

    allow_hosts: list[str] = []  # empty: any host; ".example.com": its subdomains
    follow_redirects: bool = False
    per_origin: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100  # requests in flight
    # Where apps reach this daemon's HTTP API for callbacks ("https://jobd.internal:9464");
    # sent in each request's `callback.url` when set.
    callback_url: str | None = None
    kinds: dict[str, HttpKind] = {}


_Event = Annotated[str, msgspec.Meta(pattern=r"^(completed|failed|cancelled)$")]


class Webhook(_Strict):
    """One `[[webhooks]]` entry: finishes POSTed to `url`, signed (README "Webhooks").

    The secret is never in this file: `secret_file` names a file holding it (one per
    line; two while rotating), or `secret_credential` a systemd credential
    (`$CREDENTIALS_DIRECTORY/<name>`)."""

    name: _Name
    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    events: Annotated[list[_Event], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["completed", "failed", "cancelled"])
    kinds: list[str] = []  # empty: every kind
    queues: list[str] = []  # empty: every queue
    secret_file: str | None = None
    secret_credential: _Name | None = None
    timeout: Seconds = seconds("10s")  # one request, connect to last byte
    retry_for: Seconds = seconds("24h")  # then the row is failed (replayable)
    backoff: Seconds = seconds("5s")  # the first retry's delay; doubles, +-25 % jitter
    max_backoff: Seconds = seconds("1h")
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10  # in flight, this daemon
    keep_delivered: Seconds = seconds("24h")
    keep_failed: Seconds = seconds("7d")
class Events(_Strict):
    """Events (README: "Events and flow control")."""

    # An idempotency key is accepted once within this window; written to jobd.settings
    # at start, so jobd.send_event in SQL applies it too (the last daemon started wins).
    dedup_window: Seconds = seconds("24h")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.dedup_window <= 3650 * 86400:
            raise ValueError("dedup_window must be 1 s to 3650 days")


_Mode = Annotated[str, msgspec.Meta(pattern=r"^(delay|drop|skip|cancel)$")]
_Field = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00]+$")]


class KindTools(_Strict):
    """[kinds."<kind>"]: flow-control tools laid over the handler's @job declaration
    (README "Flow-control tools"); a key set here is an args field name."""

    debounce: Seconds | None = None
    debounce_max: Seconds | None = None
    debounce_key: _Field | None = None
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | None = None
    batch_timeout: Seconds | None = None
    batch_key: _Field | None = None
    throttle: PerSecond | None = None
    throttle_burst: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    throttle_mode: _Mode | None = None
    throttle_key: _Field | None = None
    singleton_key: _Field | None = None
    singleton_mode: _Mode | None = None
    unique_for: Seconds | None = None
    unique_mode: Annotated[str, msgspec.Meta(pattern=r"^(keep|replace)$")] | None = None


class Config(_Strict):
    region: _Name = "default"
    database: Database = msgspec.field(default_factory=Database)
    control: Control = msgspec.field(default_factory=Control)
    dashboard: Dashboard = msgspec.field(default_factory=Dashboard)
    log: Log = msgspec.field(default_factory=Log)
    daemon: Daemon = msgspec.field(default_factory=Daemon)
    metrics: Metrics = msgspec.field(default_factory=Metrics)
    jobs: Jobs = msgspec.field(default_factory=Jobs)
    limits: Limits = msgspec.field(default_factory=Limits)
    tracing: Tracing = msgspec.field(default_factory=Tracing)
    handlers: Handlers = msgspec.field(default_factory=Handlers)
    http: Http = msgspec.field(default_factory=Http)
    events: Events = msgspec.field(default_factory=Events)
    queues: dict[_Name, Queue] = {}
    kinds: dict[str, KindTools] = {}  # [kinds."<kind>"]: flow-control tools per kind
    schedules: list[ScheduleSpec] = []  # [[schedules]]; see README "Schedules"
    webhooks: list[Webhook] = []  # [[webhooks]]; see README "Webhooks"

    def queue(self, name: str) -> Queue:
        return self.queues.get(name) or Queue()
