"""`jobd`: the daemon's entry point. Exit 0 on a clean stop, 78 on a bad config, 75 when
another daemon already runs on the state directory or the socket."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
from pathlib import Path

import trio

from actors.errors import InvalidArgs, UnknownKind
from actors.handlers import HANDLERS
from actors.http_handler import HttpCalls
from actors.ports import NullObserver
from actors.schedule_jobs import definition
from actors.services.outbound import Outbound
from daemon import __version__, demo, http_kinds, kind_tools, lock
from daemon.app import Daemon
from daemon.config import EX_CONFIG, Config, ConfigError, load, socket_path, state_dir
from daemon.logs import configure_logging
from daemon.reload import import_modules
from daemon.systemd import Notifier

EX_TEMPFAIL = 75  # another daemon holds the state directory or the socket: try later


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobd", description="durable job daemon on trio and Postgres")
    p.add_argument("--version", action="version", version=f"jobd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon (foreground; systemd Type=notify)")
    check = sub.add_parser("check-config", help="validate a config file and exit 0 or 78")
    demo = sub.add_parser("demo", help="run the examples on an embedded database, live")
    demo.add_argument("--state-dir", help="where the demo keeps its database (default: a temp dir)")
    demo.add_argument("--stay", action=argparse.BooleanOptionalAction, default=None,
                      help="keep the daemon and its dashboard up afterwards, until Ctrl-C "
                           "(default: when run from a terminal)")
    for each in (run, check):
        each.add_argument("--config", "-c", type=Path, default=_default_config(),
                          help="TOML config file (default: $JOBD_CONFIG, else none)")
    run.add_argument("--state-dir", help="state directory (default: $JOBD_STATE_DIR, "
                     "$STATE_DIRECTORY, ~/.local/state/jobd)")
    return p


def _default_config() -> Path | None:
    value = os.environ.get("JOBD_CONFIG")
    return Path(value) if value else None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "demo":
        return demo.run(args.state_dir, stay=args.stay)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"jobd: bad config: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.command == "check-config":
        try:
            check_handlers(config)
        except ConfigError as exc:
            print(f"jobd: bad config: {args.config or '<defaults>'}: {exc}", file=sys.stderr)
            return EX_CONFIG
        print(f"{args.config or '<defaults>'}: ok")
        return 0
    directory = state_dir(args.state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    # Before anything touches the embedded Postgres or the socket: one daemon each.
    try:
        lock.hold(directory, socket_path(config, directory))
    except lock.AlreadyRunning as exc:
        print(f"jobd: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except OSError as exc:
        print(f"jobd: cannot take the daemon lock: {exc}", file=sys.stderr)
        return EX_CONFIG
    configure_logging(config.log.level, fmt=config.log.format,
                      static={"service": "jobd", "region": config.region, "pid": os.getpid()})
    _raise_descriptor_limit()
    daemon = Daemon(config, args.config, directory, Notifier.from_env())
    try:
        trio.run(daemon.run)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - the last line of defence: say why, exit
        config_errors = _config_errors(exc)
        if config_errors:
            for error in config_errors:
                print(f"jobd: bad config: {error}", file=sys.stderr)
            return EX_CONFIG
        logging.getLogger("jobd").critical("jobd stopped on an error: %s", exc, exc_info=True,
                                           extra={"event": "daemon.crashed"})
        return 1
    return 0


def _raise_descriptor_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (often 1024 of 524288): connections and
    the database pool share it, and running out stops `accept`."""
    log = logging.getLogger("jobd")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        log.info("descriptor limit %d", soft, extra={"event": "daemon.nofile", "nofile": soft})
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc,
                    extra={"event": "daemon.nofile", "nofile": soft})
        return
    log.info("descriptor limit raised from %d to %d", soft, target,
             extra={"event": "daemon.nofile", "nofile": target})


def check_handlers(config: Config) -> None:
    """Import `handlers.modules` and register `[http.kinds]` as `jobd run` would, and
    check the config's schedules against them; ConfigError names the module (or schedule) that failed, in one line."""
    error = import_modules(config.handlers, reload=False)
    if error is not None:
        raise ConfigError(" ".join(error.split()))  # one line, whatever the module raised
    calls = HttpCalls(Outbound(allow_hosts=config.http.allow_hosts), NullObserver())
    http_kinds.install(calls, HANDLERS, http_kinds.prepare(config), config.http.allow_hosts)
    kind_tools.apply(HANDLERS, config.kinds)
    for i, spec in enumerate(config.schedules):
        try:
            definition(HANDLERS, spec, source="config")
        except (ValueError, UnknownKind, InvalidArgs) as exc:
            raise ConfigError(f"schedule {spec.name!r}: {exc} - at `$.schedules[{i}]`") from None


def _config_errors(exc: BaseException) -> list[ConfigError]:
    if isinstance(exc, ConfigError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        found = [e for sub in exc.exceptions for e in _config_errors(sub)]
        return found
    return []


if __name__ == "__main__":
    sys.exit(main())
