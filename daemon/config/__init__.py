"""One TOML file decoded into Structs; unknown keys, wrong types and bad durations or
rates name their key's path.

Precedence (highest first): command-line flags, `JOBD_DATABASE_URL` / `JOBD_LOG_LEVEL`,
systemd credentials in `$CREDENTIALS_DIRECTORY` (`database-url`, `api-token`, webhook
secrets), the file,
defaults.

This module reads the file and applies the overrides; the tables are in `sections`,
the duration and rate types they decode into in `units`, the checks that join fields
in `checks`. Callers import from here.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from daemon.config.checks import EX_CONFIG, ConfigError, check, name_queue
from daemon.config.sections import (
    Config,
    Control,
    Daemon,
    Database,
    Handlers,
    Jobs,
    KeyOverrides,
    Limits,
    Log,
    Metrics,
    Queue,
    Retention,
    Webhook,
)
from daemon.config.units import PerSecond, Seconds, decode_hook
from daemon.config.webhooks import check_webhooks, read_secrets, subscriptions

__all__ = [
    "EX_CONFIG", "Config", "ConfigError", "Control", "Daemon", "Database", "Handlers", "Jobs",
    "KeyOverrides", "Limits", "Log", "Metrics", "PerSecond", "Queue", "Retention", "Seconds",
    "Webhook", "load", "read_secrets", "read_token", "socket_path", "state_dir", "subscriptions",
]


def load(path: Path | None, environ: dict[str, str] | None = None) -> Config:
    """Read, decode (durations and rates into floats), apply overrides, check; ConfigError
    on any problem."""
    environ = dict(os.environ if environ is None else environ)
    where = str(path) if path else "<defaults>"
    try:
        config = (
            msgspec.toml.decode(path.read_bytes(), type=Config, dec_hook=decode_hook)
            if path else Config()
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"{where}: no such file") from exc
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {name_queue(path, exc)}") from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if path:
        base = path.parent
        config.handlers.paths = [str((base / p).resolve()) for p in config.handlers.paths]
        for kind in config.http.kinds.values():
            if kind.secret_file is not None:
                kind.secret_file = str((base / kind.secret_file).resolve())
        for hook in config.webhooks:
            if hook.secret_file is not None:
                hook.secret_file = str((base / hook.secret_file).resolve())
    url = environ.get("JOBD_DATABASE_URL") or _credential(environ, "database-url")
    if url:
        config.database.url = url
    if level := environ.get("JOBD_LOG_LEVEL"):
        config.log.level = level
    check(config, where)
    check_webhooks(config, where, environ)
    return config


def _credential(environ: dict[str, str], name: str) -> str | None:
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    try:
        return (Path(directory) / name).read_text().strip() or None
    except OSError:
        return None


def read_token(config: Config, environ: dict[str, str] | None = None) -> str | None:
    """The API token: control.token_file, else the systemd credential api-token."""
    return _token(config.control.token_file, "control.token_file", "api-token", environ)


def read_dashboard_token(config: Config, environ: dict[str, str] | None = None) -> str | None:
    """The read-only dashboard token: dashboard.read_token_file, else the systemd
    credential dashboard-read-token."""
    return _token(config.dashboard.read_token_file, "dashboard.read_token_file",
                  "dashboard-read-token", environ)


def _token(path: str | None, key: str, credential: str,
           environ: dict[str, str] | None) -> str | None:
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            raise ConfigError(f"{key}: {exc}") from exc
    return _credential(dict(os.environ if environ is None else environ), credential)


def state_dir(flag: str | None, environ: dict[str, str] | None = None) -> Path:
    environ = dict(os.environ if environ is None else environ)
    chosen = flag or environ.get("JOBD_STATE_DIR") or environ.get("STATE_DIRECTORY")
    if chosen:
        # systemd may pass several colon-separated directories; the first is ours.
        return Path(chosen.split(":")[0]).expanduser()
    return Path.home() / ".local" / "state" / "jobd"


def socket_path(config: Config, state: Path) -> Path:
    return Path(config.control.socket) if config.control.socket else state / "jobd.sock"
