"""One TOML file decoded into Structs; unknown keys and wrong types name their path.

Precedence (highest first): command-line flags, `JOBD_DATABASE_URL` / `JOBD_LOG_LEVEL`,
systemd credentials in `$CREDENTIALS_DIRECTORY` (`database-url`, `api-token`), the file,
defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import msgspec

from protocol.durations import parse_duration, parse_rate
from protocol.schedules import ScheduleSpec

EX_CONFIG = 78

class ConfigError(Exception):
    """A config file that jobd refuses; the message names the file and the key."""


Duration = str | float | int
_Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Database(_Strict):
    url: str | None = None
    pool_min: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2
    pool_max: Annotated[int, msgspec.Meta(ge=1, le=200)] = 10
    timeout: Duration = "30s"


class Control(_Strict):
    socket: str | None = None  # default: <state dir>/jobd.sock
    socket_group: str | None = None
    # "127.0.0.1:8080", "unix:/path", or a list of them; unset = no HTTP server
    http: str | list[str] | None = None
    http_graceful_timeout: Duration = "10s"  # in-flight requests may finish this long
    token_file: str | None = None
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 256


class Log(_Strict):
    level: Annotated[str, msgspec.Meta(pattern=r"^(debug|info|warning|error)$")] = "info"
    format: Annotated[str, msgspec.Meta(pattern=r"^(auto|json|human)$")] = "auto"


class Handlers(_Strict):
    modules: list[str] = []
    paths: list[str] = []  # prepended to sys.path before importing, relative to the file


Rate = str | float | int  # "5/s", "30/m", or events per second


class KeyLimits(_Strict):
    """Per-key overrides of the queue's key limits (`[queues.crawl.keys.slow]`)."""

    key_concurrency: Annotated[int, msgspec.Meta(ge=0)] | None = None
    rate: Rate | None = None
    burst: Annotated[float, msgspec.Meta(gt=0)] | None = None
    tokens_per_minute: Annotated[float, msgspec.Meta(gt=0)] | None = None
    adaptive: bool | None = None
    breaker_failures: Annotated[int, msgspec.Meta(ge=1)] | None = None
    breaker_cooldown: Duration | None = None


class Queue(_Strict):
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 10
    timeout: Duration | None = None  # per-attempt default for kinds that set none
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] | None = None
    claim_batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 200
    # Flow control, enforced in Postgres across every daemon (README: "Flow control").
    key_concurrency: Annotated[int, msgspec.Meta(ge=0)] | None = None
    rate: Rate | None = None  # per key
    burst: Annotated[float, msgspec.Meta(gt=0)] | None = None
    tokens_per_minute: Annotated[float, msgspec.Meta(gt=0)] | None = None  # per key, by job cost
    queue_rate: Rate | None = None  # the whole queue
    queue_burst: Annotated[float, msgspec.Meta(gt=0)] | None = None
    adaptive: bool = False
    breaker_failures: Annotated[int, msgspec.Meta(ge=1)] | None = None
    breaker_cooldown: Duration = "30s"
    aging: Duration | None = None  # waiting this long moves a job one priority step up
    aging_floor: int = 0
    keys: dict[str, KeyLimits] = {}

    def flow_limits(self) -> dict[str, Any] | None:
        """The limits jobd.claim_flow applies, or None when the queue has none."""
        default = _key_limits(self.key_concurrency, self.rate, self.burst,
                              self.tokens_per_minute, self.adaptive or None,
                              self.breaker_failures,
                              self.breaker_cooldown if self.breaker_failures else None)
        keys = {
            name: _key_limits(k.key_concurrency, k.rate, k.burst, k.tokens_per_minute,
                              k.adaptive, k.breaker_failures, k.breaker_cooldown)
            for name, k in self.keys.items()
        }
        if not default and not any(keys.values()) and self.queue_rate is None:
            return None
        limits: dict[str, Any] = {"default": default, "keys": keys}
        if self.queue_rate is not None:
            limits["queue_rate"] = parse_rate(self.queue_rate)
            if self.queue_burst is not None:
                limits["queue_burst"] = self.queue_burst
        return limits

    def fastest_rate(self) -> float | None:
        """Events per second of the quickest bucket: how often a limited claim rechecks."""
        rates = [parse_rate(r) for r in (self.rate, self.queue_rate) if r is not None]
        rates += [parse_rate(k.rate) for k in self.keys.values() if k.rate is not None]
        rates += [t / 60 for t in [self.tokens_per_minute] if t]
        return max(rates) if rates else None


def _key_limits(concurrency: int | None, rate: Rate | None, burst: float | None,
                tpm: float | None, adaptive: bool | None, breaker_failures: int | None,
                breaker_cooldown: Duration | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if concurrency is not None:
        out["concurrency"] = concurrency
    if rate is not None:
        out["rate"] = parse_rate(rate)
    if burst is not None:
        out["burst"] = burst
    if tpm is not None:
        out["tpm"] = tpm
    if adaptive is not None:
        out["adaptive"] = adaptive
    if breaker_failures is not None:
        out["breaker_failures"] = breaker_failures
    if breaker_cooldown is not None:
        out["breaker_cooldown_s"] = parse_duration(breaker_cooldown)
    return out


class Retention(_Strict):
    completed_max_age: Duration = "24h"
    completed_max_count: Annotated[int, msgspec.Meta(ge=0)] = 1000
    failed_max_age: Duration = "7d"
    failed_max_count: Annotated[int, msgspec.Meta(ge=0)] = 100_000
    cancelled_max_age: Duration = "7d"
    cancelled_max_count: Annotated[int, msgspec.Meta(ge=0)] = 100_000


class Jobs(_Strict):
    lease: Duration = "30s"  # renewed every lease/3 while the daemon lives
    poll_interval: Duration = "2s"  # fallback when NOTIFY is lost
    timeout_grace: Duration = "60s"  # reaper's margin past a job's own timeout
    reaper_interval: Duration = "5s"
    progress_every_items: Annotated[int, msgspec.Meta(ge=1)] = 100
    progress_every: Duration = "2s"
    snooze_burns_attempt: bool = False
    # An attempt's timeout when neither its kind nor its queue sets one ("0s": none).
    max_runtime: Duration = "1h"
    retention: Retention = msgspec.field(default_factory=Retention)


class Metrics(_Strict):
    leader_interval: Duration = "5s"  # queue gauges: leader refresh, others retry the lock
    key_series_limit: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 50  # per queue
    keys: list[str] = []  # always get their own `key` label, beyond the limit


class Daemon(_Strict):
    drain_grace: Duration = "30s"
    heartbeat: Duration = "5s"
    # A task step holding the event loop this long logs a warning naming the handler.
    loop_lag_warning: Duration = "1s"


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


class Config(_Strict):
    region: _Name = "default"
    database: Database = msgspec.field(default_factory=Database)
    control: Control = msgspec.field(default_factory=Control)
    log: Log = msgspec.field(default_factory=Log)
    daemon: Daemon = msgspec.field(default_factory=Daemon)
    metrics: Metrics = msgspec.field(default_factory=Metrics)
    jobs: Jobs = msgspec.field(default_factory=Jobs)
    limits: Limits = msgspec.field(default_factory=Limits)
    handlers: Handlers = msgspec.field(default_factory=Handlers)
    queues: dict[_Name, Queue] = {}
    schedules: list[ScheduleSpec] = []  # [[schedules]]; see README "Schedules"

    def queue(self, name: str) -> Queue:
        return self.queues.get(name) or Queue()


_DURATION_FIELDS = {
    "metrics.leader_interval", "control.http_graceful_timeout",
    "database.timeout", "jobs.lease", "jobs.poll_interval", "jobs.timeout_grace",
    "jobs.reaper_interval", "jobs.progress_every", "daemon.drain_grace", "daemon.heartbeat",
    "jobs.max_runtime", "daemon.loop_lag_warning",
}


def load(path: Path | None, environ: dict[str, str] | None = None) -> Config:
    """Read, decode, apply overrides, validate durations; ConfigError on any problem."""
    environ = dict(os.environ if environ is None else environ)
    where = str(path) if path else "<defaults>"
    try:
        config = (
            msgspec.toml.decode(path.read_bytes(), type=Config) if path else Config()
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"{where}: no such file") from exc
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {_name_queue(path, exc)}") from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if path:
        base = path.parent
        config.handlers.paths = [str((base / p).resolve()) for p in config.handlers.paths]
    url = environ.get("JOBD_DATABASE_URL") or _credential(environ, "database-url")
    if url:
        config.database.url = url
    if level := environ.get("JOBD_LOG_LEVEL"):
        config.log.level = level
    _validate(config, where)
    return config


def _name_queue(path: Path | None, exc: msgspec.ValidationError) -> str:
    """msgspec spells a dict entry `$.queues[...]`; name the queue that failed instead."""
    message = str(exc)
    if path is None or "$.queues[...]" not in message:
        return message
    try:
        queues = msgspec.toml.decode(path.read_bytes()).get("queues")
    except (OSError, msgspec.DecodeError):
        return message
    for name, value in queues.items() if isinstance(queues, dict) else ():
        try:
            msgspec.convert(value, Queue)
        except msgspec.ValidationError as inner:
            text = str(inner)
            if " - at `$" in text:
                return text.replace(" - at `$", f" - at `$.queues.{name}", 1)
            return f"{text} - at `$.queues.{name}`"
    return message


def _validate(config: Config, where: str) -> None:
    for dotted in sorted(_DURATION_FIELDS):
        section, name = dotted.split(".")
        _check_duration(getattr(getattr(config, section), name), f"$.{dotted}", where)
    for name, queue in config.queues.items():
        for field in ("timeout", "breaker_cooldown", "aging"):
            if getattr(queue, field) is not None:
                _check_duration(getattr(queue, field), f"$.queues.{name}.{field}", where)
        for field in ("rate", "queue_rate"):
            _check_rate(getattr(queue, field), f"$.queues.{name}.{field}", where)
        for key, limits in queue.keys.items():
            _check_rate(limits.rate, f"$.queues.{name}.keys.{key}.rate", where)
            if limits.breaker_cooldown is not None:
                _check_duration(limits.breaker_cooldown,
                                f"$.queues.{name}.keys.{key}.breaker_cooldown", where)
    _check_schedules(config.schedules, where)
    if config.limits.max_frame_bytes < config.limits.max_args_bytes + 64 * 1024:
        raise ConfigError(f"{where}: limits.max_frame_bytes must exceed limits.max_args_bytes "
                          "by at least 64 KiB (a frame carries the args and the command) "
                          "- at `$.limits.max_frame_bytes`")
    retention = config.jobs.retention
    for state in ("completed", "failed", "cancelled"):
        _check_duration(getattr(retention, f"{state}_max_age"), f"$.jobs.retention.{state}_max_age", where)
    if config.log.level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{where}: log level must be debug|info|warning|error - at `$.log.level`")


def _check_schedules(schedules: list[ScheduleSpec], where: str) -> None:
    """Timing, zone and durations; the kind and args are checked once handlers load."""
    from actors.schedule import Timing, every_seconds, validate

    seen: set[str] = set()
    for i, spec in enumerate(schedules):
        path = f"$.schedules[{i}]"
        if spec.name in seen:
            raise ConfigError(f"{where}: schedule {spec.name!r} is declared twice - at `{path}.name`")
        seen.add(spec.name)
        for field in ("every", "jitter", "grace"):
            if getattr(spec, field) is not None:
                _check_duration(getattr(spec, field), f"{path}.{field}", where)
        try:
            validate(Timing(cron=spec.cron, every_s=every_seconds(spec.every), tz=spec.tz))
        except ValueError as exc:
            raise ConfigError(f"{where}: schedule {spec.name!r}: {exc} - at `{path}`") from exc


def _check_rate(value: Rate | None, path: str, where: str) -> None:
    if value is None:
        return
    try:
        parse_rate(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc} - at `{path}`") from exc


def _check_duration(value: Duration, path: str, where: str) -> None:
    try:
        parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc} - at `{path}`") from exc


def _credential(environ: dict[str, str], name: str) -> str | None:
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    try:
        return (Path(directory) / name).read_text().strip() or None
    except OSError:
        return None


def read_token(config: Config, environ: dict[str, str] | None = None) -> str | None:
    environ = dict(os.environ if environ is None else environ)
    if config.control.token_file:
        try:
            return Path(config.control.token_file).read_text().strip() or None
        except OSError as exc:
            raise ConfigError(f"control.token_file: {exc}") from exc
    return _credential(environ, "api-token")


def state_dir(flag: str | None, environ: dict[str, str] | None = None) -> Path:
    environ = dict(os.environ if environ is None else environ)
    chosen = flag or environ.get("JOBD_STATE_DIR") or environ.get("STATE_DIRECTORY")
    if chosen:
        # systemd may pass several colon-separated directories; the first is ours.
        return Path(chosen.split(":")[0]).expanduser()
    return Path.home() / ".local" / "state" / "jobd"


def socket_path(config: Config, state: Path) -> Path:
    return Path(config.control.socket) if config.control.socket else state / "jobd.sock"
