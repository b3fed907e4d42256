"""Importing the handler modules, at start and again on a reload (SIGHUP, `jobctl reload`).

A reload is all or nothing: a bad file or a handler module that fails to re-import
(raising anything, SystemExit included) or takes longer than `handlers.import_timeout`
refuses it, and the running config and handlers stay. The re-import runs on a worker
thread: a module that sleeps at import must not stall the control socket, and one that
raises SystemExit must not stop the daemon.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from actors.handlers import Handlers as HandlerRegistry
from actors.http_handler import HttpCalls
from daemon import http_kinds, kind_tools
from daemon.config import Config, ConfigError, Handlers, load
from daemon.logs import set_level
from daemon.systemd import Notifier as Systemd
from protocol import commands as c

log = logging.getLogger("jobd.app")


def import_modules(cfg: Handlers, *, reload: bool) -> str | None:
    """Import (or re-import) the configured modules; the error naming the one that failed."""
    # Like `python -m`: modules next to where jobd was started are importable.
    for path in [*cfg.paths, os.getcwd()]:
        if path not in sys.path:
            sys.path.insert(0, path)
    for name in cfg.modules:
        module = sys.modules.get(name)
        try:
            if reload and module is not None:
                importlib.reload(module)
            else:
                importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt too: the module's failure
            return f"handlers.modules: cannot import {name!r}: {exc!r}"
    return None


def import_handlers(cfg: Handlers, registry: HandlerRegistry) -> None:
    """Import the configured modules at start; ConfigError names the one that failed
    (also when it raised SystemExit or KeyboardInterrupt: its failure, not ours)."""
    error = import_modules(cfg, reload=False)
    if error is not None:
        raise ConfigError(error)
    _log_loaded(registry)


def _log_loaded(registry: HandlerRegistry) -> None:
    log.info("handlers: %s", ", ".join(registry.kinds()) or "none",
             extra={"event": "handlers.loaded"})


class Reloader:
    """Re-reads the config file into the running `config` (log level, queues,
    handlers, schedules change live), then lets the daemon apply it (`apply`)."""

    def __init__(self, config: Config, config_path: Path | None, systemd: Systemd, *,
                 registry: HandlerRegistry, apply: Callable[[], Awaitable[None]],
                 status_line: Callable[[], str], http_calls: HttpCalls | None = None):
        self._config = config
        self._registry = registry
        self._http_calls = http_calls
        self._config_path = config_path
        self._systemd = systemd
        self._apply = apply
        self._status_line = status_line
        self._reloading = False
        self._handler_import: _HandlerImport | None = None

    async def reload(self) -> c.ReloadResult:
        pending = self._handler_import
        if pending is not None and not pending.done.is_set():
            return self._refuse(
                f"the handler import of an earlier reload is still running "
                f"({time.monotonic() - pending.started:.0f} s)")
        if self._reloading:
            return self._refuse("another reload is in progress")
        self._reloading = True
        try:
            return await self._reload()
        finally:
            self._reloading = False

    async def on_signal(self) -> None:
        try:
            await self.reload()
        except Exception:  # noqa: BLE001 - a reload never stops the daemon
            log.exception("reload failed", extra={"event": "config.reload_failed"})

    def _refuse(self, why: str) -> c.ReloadResult:
        log.error("reload refused, keeping the running config and handlers: %s", why,
                  extra={"event": "config.reload_failed"})
        self._systemd.ready(self._status_line())
        return c.ReloadResult(ok=False, message=f"refused, running config kept: {why}")

    async def _reload(self) -> c.ReloadResult:
        self._systemd.reloading()
        try:
            new = load(self._config_path)
            kinds = http_kinds.prepare(new)  # secrets read, schemas compiled: may refuse
        except ConfigError as exc:
            return self._refuse(str(exc))
        attempt = self._handler_import = _HandlerImport(new.handlers, self._registry)
        timeout_s = new.handlers.import_timeout
        try:
            with trio.move_on_after(timeout_s):
                await trio.to_thread.run_sync(attempt.run, abandon_on_cancel=True)
        finally:
            if not attempt.done.is_set():
                attempt.abandon()  # timed out (or we are stopping): its registrations are undone
        if not attempt.done.is_set():
            return self._refuse(
                f"handlers.modules: the re-import took longer than {timeout_s:g} s "
                "(handlers.import_timeout); abandoned, previous handlers kept")
        if attempt.error is not None:
            return self._refuse(f"{attempt.error}; previous handlers kept")
        if self._http_calls is not None:
            try:
                http_kinds.install(self._http_calls, self._registry, kinds,
                                   new.http.allow_hosts)
            except ConfigError as exc:
                self._registry.restore(attempt.snapshot)
                return self._refuse(f"{exc}; previous handlers kept")
        try:
            kind_tools.apply(self._registry, new.kinds)
        except ConfigError as exc:
            self._registry.restore(attempt.snapshot)
            return self._refuse(f"{exc}; previous handlers kept")
        _log_loaded(self._registry)
        set_level(new.log.level)
        config = self._config
        config.log = new.log
        config.queues = new.queues
        config.handlers = new.handlers
        config.kinds = new.kinds
        config.schedules = new.schedules
        config.http = new.http
        config.webhooks = new.webhooks
        await self._apply()
        log.info("config reloaded", extra={"event": "config.reloaded"})
        self._systemd.ready(self._status_line())
        return c.ReloadResult(ok=True, message="reloaded")


class _HandlerImport:
    """One re-import of the handler modules, run on a worker thread by a reload.

    A failed import puts the registry back as it was. One the daemon stopped waiting for
    (abandon) cannot be stopped, so the registry is put back at once and again when the
    import ends; until then a module still running may register kinds for a moment.
    """

    def __init__(self, cfg: Handlers, registry: HandlerRegistry):
        self.cfg = cfg
        self.registry = registry
        self.snapshot = registry.registered()
        self.started = time.monotonic()
        self.done = threading.Event()
        self.error: str | None = None
        self._lock = threading.Lock()
        self._abandoned = False

    def run(self) -> None:
        error = None
        try:
            error = import_modules(self.cfg, reload=True)
        finally:
            with self._lock:
                self.error = error
                if error is not None or self._abandoned:
                    self.registry.restore(self.snapshot)
                self.done.set()
            if self._abandoned:
                log.warning("an abandoned handler import ended after %.0f s (%s); its handlers "
                            "were discarded", time.monotonic() - self.started, error or "ok",
                            extra={"event": "handlers.abandoned_import_ended"})

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            if not self.done.is_set():
                self.registry.restore(self.snapshot)
