"""How the daemon meets its database: the embedded Postgres when none is configured,
reaching the database (retried until it answers or we are told to stop), leaving it,
and the hold on rescuing leases after an outage.

Waiting for the database is the normal start of a daemon whose server boots with it,
so every wait here ends early when the stop event is set (SIGTERM while waiting).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from actors import events
from actors.handlers import Handlers
from actors.ports import StoreUnavailable, ValueRejected
from daemon import __version__
from daemon.embedded import EmbeddedPostgres
from daemon.store import PgStore

log = logging.getLogger("jobd.app")


@asynccontextmanager
async def database_url(configured: str | None, state_dir: Path) -> AsyncIterator[str]:
    """The configured URL, or that of an embedded Postgres in the state directory,
    started here and stopped when the block ends."""
    if configured is not None:
        yield configured
        return
    embedded: EmbeddedPostgres | None = None

    def start() -> str:
        nonlocal embedded
        embedded = EmbeddedPostgres(state_dir)
        embedded.start()
        log.info("embedded Postgres running in %s", embedded.datadir,
                 extra={"event": "embedded.started"})
        return embedded.create_database("jobd")

    try:
        yield await trio.to_thread.run_sync(start)
    finally:
        if embedded is not None:
            await trio.to_thread.run_sync(embedded.stop)
            log.info("embedded Postgres stopped", extra={"event": "embedded.stopped"})


async def until_available(step: Callable[[], Awaitable[None]], stop: trio.Event, *,
                          waiting: Callable[[StoreUnavailable], object] = lambda exc: None) -> bool:
    """Run `step` until it does not find the database unavailable (True), backing off
    up to 10 s; False if `stop` is set first. `waiting(exc)` hears each failure."""
    backoff = 0.2
    while not stop.is_set():
        try:
            await step()
            return True
        except StoreUnavailable as exc:
            waiting(exc)
            log.warning("database not reachable, retrying in %.1fs: %s", backoff, exc,
                        extra={"event": "store.unavailable"})
            with trio.move_on_after(backoff):
                await stop.wait()
            backoff = min(backoff * 2, 10.0)
    return False


async def register(store: PgStore, daemon_id: str, region: str) -> None:
    await store.connect()
    await store.register_daemon(daemon_id, region, socket.gethostname(), os.getpid(),
                                __version__)


async def deregister(store: PgStore, daemon_id: str) -> None:
    try:
        with trio.move_on_after(3):  # a hung database must not hold the exit
            await store.deregister_daemon(daemon_id)
    except StoreUnavailable as exc:
        log.warning("could not deregister (the daemons row ages out): %s", exc,
                    extra={"event": "daemon.deregister_failed"})


def rescue_hold(store: PgStore, beat_s: float) -> str | None:
    """Why the reaper must not rescue expired leases yet (None: it may).

    After an outage every lease may have lapsed, including those of jobs that
    finished here meanwhile. Rescue waits until this daemon's heart has renewed its
    leases since the last failed store call, and for two heartbeat intervals after
    it, so that the other live daemons have renewed theirs too.
    """
    if store.unavailable_at is None:
        return None
    if store.renewed_at is None or store.renewed_at < store.unavailable_at:
        return "waiting for this daemon's leases to be renewed after the outage"
    if time.monotonic() - store.unavailable_at < 2 * beat_s:
        return "the database just came back; live daemons renew their leases first"
    return None


def live_s(heartbeat_s: float) -> float:
    """A daemon whose heartbeat is older than this no longer counts as serving."""
    return max(30.0, 3 * heartbeat_s)


async def publish(store: PgStore, daemon_id: str, queues: list[str], *, max_args_bytes: int,
                  daemon_live_s: float, event_dedup_s: float = 86400.0) -> None:
    """The queues served here (for enqueue warnings) and the limits for jobd.enqueue.

    Once, at start: a reload neither adds dispatchers nor changes [limits]."""
    try:
        await store.set_daemon_queues(daemon_id, queues)
        await store.put_settings({"max_args_bytes": max_args_bytes,
                                  "daemon_live_s": daemon_live_s,
                                  "event_dedup_s": event_dedup_s})
    except (StoreUnavailable, ValueRejected) as exc:
        log.warning("could not record this daemon's queues and limits: %s", exc,
                    extra={"event": "store.unavailable"})


async def sync_subscriptions(store: PgStore, daemon_id: str, handlers: Handlers,
                             live_s: float) -> None:
    """What this daemon's handlers declare (on_event, cancel_on) into Postgres, where a
    send from SQL reads it; at start and after each reload. Raises StoreUnavailable."""
    declared = events.subscriptions(handlers.registered().values())
    kept, removed = await store.sync_subscriptions(daemon_id, declared, handlers.kinds(),
                                                   live_s)
    log.info("event subscriptions: %d declared here, %d removed", kept, removed,
             extra={"event": "events.subscriptions", "declared": kept, "removed": removed})
