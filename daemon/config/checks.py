"""What a field's type cannot say about a decoded config: bounds that join two fields,
the schedules' timing, and where in `[queues.<name>]` a decode error happened.

Each check raises ConfigError naming the file and the key's path, as the decoder does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import msgspec

from actors.schedule import Timing, check_durations, validate
from daemon.config.sections import Config, KeyOverrides, Queue
from daemon.config.units import decode_hook
from protocol.durations import format_duration, parse_duration
from protocol.schedules import ScheduleSpec

OTLP_EXPORTER = "opentelemetry.exporter.otlp.proto.http"
EX_CONFIG = 78  # sysexits.h: the exit status of a config jobd refuses
_YEAR_S = 86400 * 365


class ConfigError(Exception):
    """A config file that jobd refuses; the message names the file and the key."""


def check(config: Config, where: str) -> None:
    for name in ("http_read_timeout", "http_write_timeout", "http_keep_alive"):
        if not 0 < getattr(config.control, name) < _YEAR_S:
            raise ConfigError(f"{where}: control.{name} must be a positive duration "
                              f"- at `$.control.{name}`")
    for name, low, high in (("session_lifetime", 60, 30 * 86400), ("refresh", 0.5, 3600)):
        if not low <= getattr(config.dashboard, name) <= high:
            raise ConfigError(f"{where}: dashboard.{name} must be between "
                              f"{format_duration(low)} and {format_duration(high)} "
                              f"- at `$.dashboard.{name}`")
    _check_schedules(config.schedules, where)
    if config.limits.max_frame_bytes < config.limits.max_args_bytes + 64 * 1024:
        raise ConfigError(f"{where}: limits.max_frame_bytes must exceed limits.max_args_bytes "
                          "by at least 64 KiB (a frame carries the args and the command) "
                          "- at `$.limits.max_frame_bytes`")
    if config.tracing.enabled and not _installed(OTLP_EXPORTER):
        raise ConfigError(f"{where}: tracing.enabled needs the OTLP exporter "
                          f"(pip install 'jobd[otlp]') - at `$.tracing.enabled`")
    if config.log.level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{where}: log level must be debug|info|warning|error - at `$.log.level`")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _check_schedules(schedules: list[ScheduleSpec], where: str) -> None:
    """Timing, zone and durations; the kind and args are checked once handlers load.

    A schedule's durations stay as written (a ScheduleSpec also arrives over the
    socket), so they are parsed here only to name a bad one's path.
    """
    seen: set[str] = set()
    for i, spec in enumerate(schedules):
        path = f"$.schedules[{i}]"
        if spec.name in seen:
            raise ConfigError(f"{where}: schedule {spec.name!r} is declared twice - at `{path}.name`")
        seen.add(spec.name)
        for field in ("every", "jitter", "grace"):
            if (value := getattr(spec, field)) is not None:
                try:
                    parse_duration(value)
                except ValueError as exc:
                    raise ConfigError(f"{where}: {exc} - at `{path}.{field}`") from exc
        try:
            every_s, _, _ = check_durations(spec)
            validate(Timing(cron=spec.cron, every_s=every_s, tz=spec.tz))
        except ValueError as exc:
            raise ConfigError(f"{where}: schedule {spec.name!r}: {exc} - at `{path}`") from exc


def name_queue(path: Path | None, exc: msgspec.ValidationError) -> str:
    """msgspec spells a dict entry `$.queues[...]`; name the queue (and key) that failed."""
    message = str(exc)
    if path is None or "$.queues[...]" not in message:
        return message
    try:
        queues = msgspec.toml.decode(path.read_bytes()).get("queues")
    except (OSError, msgspec.DecodeError):
        return message
    for name, value in queues.items() if isinstance(queues, dict) else ():
        try:
            msgspec.convert(value, Queue, dec_hook=decode_hook)
        except msgspec.ValidationError as inner:
            return _at(f"$.queues.{name}", _name_key(value, str(inner)))
    return message


def _name_key(queue: Any, message: str) -> str:
    """The same for `$.keys[...]` inside one queue."""
    keys = queue.get("keys") if isinstance(queue, dict) else None
    if "$.keys[...]" not in message or not isinstance(keys, dict):
        return message
    for key, value in keys.items():
        try:
            msgspec.convert(value, KeyOverrides, dec_hook=decode_hook)
        except msgspec.ValidationError as inner:
            return _at(f"$.keys.{key}", str(inner))
    return message


def _at(prefix: str, message: str) -> str:
    """An error inside an entry, its path put under the entry's."""
    if " - at `$" in message:
        return message.replace(" - at `$", f" - at `{prefix}", 1)
    return f"{message} - at `{prefix}`"
