"""The composition root: database, actor tree, control socket, signals, drain.

Order of life: signals are caught first (so SIGTERM always drains), then the
database (embedded or configured) is reached and migrated, the actors start, the
control socket opens, and only then READY=1. Stopping reverses it.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import trio

from actors import failure_hooks, validate
from actors.flow import FlowLimits
from actors.handlers import HANDLERS
from actors.handlers import Handlers as HandlerRegistry
from actors.ports import Outcome, ProgressUpdate, StoreUnavailable, ValueRejected
from actors.runtime import lag
from actors.runtime.clock import TrioClock
from actors.runtime.mailbox import Mailbox, MailboxClosed
from actors.runtime.registry import Registry
from actors.runtime.specs import ChildSpec, Strategy
from actors.runtime.supervisor import Supervisor
from actors.services.batcher import Backlog, Batcher
from actors.services.control import Control
from actors.services.dispatcher import (
    CancelJob,
    Dispatcher,
    DispatcherMsg,
    Drain,
    LeaseLost,
    QueueSettings,
    Release,
    Resize,
    Wake,
)
from actors.services.heart import Beat, Heart
from actors.services.key_views import key_stats
from actors.services.outcomes import error_class, refused_outcome
from actors.services.peer import Leadership, Peer
from actors.services.reaper import AgingRule, Reaper, ReaperSettings, RetentionRule, Sweep
from actors.services.scheduler import Scheduler, SchedulerMsg, SchedulerSettings, SyncConfig, Tick
from actors.services.worker import AttemptRunner
from daemon import __version__
from daemon.api.control_socket import ControlServer, open_listener
from daemon.api.http import HttpApp
from daemon.api.http_server import HttpServer
from daemon.config import (
    Config,
    ConfigError,
    Handlers,
    Queue,
    load,
    read_token,
    socket_path,
)
from daemon.metrics import Metrics, run_queue_gauges
from daemon.store import MetricsSession, PgStore, bridge
from daemon.systemd import Notifier, run_watchdog
from protocol import commands as c
from protocol.jobs import KeyStats

log = logging.getLogger("jobd.app")


class Daemon:
    def __init__(self, config: Config, config_path: Path | None, state_dir: Path,
                 notifier: Notifier):
        self.config = config
        self.config_path = config_path
        self.state_dir = state_dir
        self.notifier = notifier
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.clock = TrioClock()
        self.registry = Registry()
        self.metrics = Metrics(version=__version__, region=config.region, daemon_id=self.id,
                               running=self._running_here, mailboxes=self.registry,
                               ready=self._ready_now, key_series_limit=config.metrics.key_series_limit,
                               keys=config.metrics.keys)
        self.observer = self.metrics.observer
        self.draining = False
        self.ready = False
        self.store: PgStore | None = None
        self.embedded: Any = None
        self.dispatchers: dict[str, Dispatcher] = {}
        self._dispatcher_boxes: dict[str, Mailbox[DispatcherMsg]] = {}
        self._stop = trio.Event()
        self._limits: dict[str, FlowLimits | None] = {}
        self._timeouts: dict[str, float | None] = {}
        self.pauses: set[tuple[str, str]] = set()  # (queue, key); key "" = the whole queue
        self._nursery: trio.Nursery | None = None
        self._reloading = False
        self._handler_import: _HandlerImport | None = None
        self.handlers = HANDLERS  # the kinds `@job` registered as handler modules imported
        self._pauses_refreshing = False
        self._pauses_stale = False
        self._notify_drops = 0
        self._notify_warned_at = -NOTIFY_WARN_EVERY_S
        # Outcomes handed to the completer and not yet written, by (job, lease token):
        # their leases are renewed like running jobs', and the drain reports them.
        self._unwritten: dict[tuple[int, int], Outcome] = {}
        self._completer_backlog: Backlog[Outcome] = Backlog()
        self._progress_backlog: Backlog[ProgressUpdate] = Backlog()

    # -- life -------------------------------------------------------------------------

    async def run(self) -> None:
        instrument = lag.LoopLag(self.config.daemon.loop_lag_warning,
                                 on_block=self._loop_blocked)
        instrument.install()
        try:
            await self._run_signals()
        finally:
            instrument.uninstall()

    def _loop_blocked(self, kind: str | None, seconds: float) -> None:
        self.metrics.loop_blocks.inc((kind or "",))

    async def _run_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, signals, nursery)
                nursery.start_soon(lag.probe, self.clock, 0.5,
                                   partial(self.metrics.loop_lag.observe, ()))
                interval = self.notifier.watchdog_interval()
                if interval:
                    nursery.start_soon(run_watchdog, self.notifier, interval)
                try:
                    await self._run_database()
                finally:
                    nursery.cancel_scope.cancel()

    async def _run_database(self) -> None:
        url = self.config.database.url
        if url is None:
            url = await trio.to_thread.run_sync(self._start_embedded)
        try:
            async with bridge.open_loop(on_error=self.observer.loop_error):
                db = self.config.database
                self.store = PgStore(url, pool_min=db.pool_min, pool_max=db.pool_max,
                                     timeout_s=db.timeout)
                self.store.observer = self.observer
                try:
                    if await self._connect():
                        await self._run_actors()
                finally:
                    await self.store.close()
        finally:
            if self.embedded is not None:
                await trio.to_thread.run_sync(self.embedded.stop)
                log.info("embedded Postgres stopped", extra={"event": "embedded.stopped"})

    def _start_embedded(self) -> str:
        from daemon.embedded import EmbeddedPostgres

        self.embedded = EmbeddedPostgres(self.state_dir)
        self.embedded.start()
        log.info("embedded Postgres running in %s", self.embedded.datadir,
                 extra={"event": "embedded.started"})
        return self.embedded.create_database("jobd")

    async def _connect(self) -> bool:
        """Retry until the database answers (or we are told to stop); False if stopped."""
        assert self.store is not None
        backoff = 0.2
        while not self._stop.is_set():
            try:
                await self.store.connect()
                await self.store.register_daemon(self.id, self.config.region, socket.gethostname(),
                                                 os.getpid(), __version__)
                return True
            except StoreUnavailable as exc:
                self.notifier.status(f"waiting for the database: {exc}")
                log.warning("database not reachable, retrying in %.1fs: %s", backoff, exc,
                            extra={"event": "store.unavailable"})
                with trio.move_on_after(backoff):
                    await self._stop.wait()
                backoff = min(backoff * 2, 10.0)
        return False

    async def _run_actors(self) -> None:
        assert self.store is not None
        self.import_handlers()
        validate.configure(self.config.limits.max_args_bytes)
        backoff = 0.2
        while True:
            try:
                await self.store.register_failure_hooks(failure_hooks.hooked_kinds(self.handlers))
                break
            except StoreUnavailable as exc:  # the database went away right after connecting
                log.warning("database not reachable, retrying in %.1fs: %s", backoff, exc,
                            extra={"event": "store.unavailable"})
                with trio.move_on_after(backoff):
                    await self._stop.wait()
                if self._stop.is_set():
                    return
                backoff = min(backoff * 2, 10.0)
        root = self._build_tree()
        await self._publish_queues_and_limits()
        limits = self.config.limits
        control = Control(self.store, handlers=self.handlers, server=f"jobd/{__version__}", pong=self._pong,
                          tree=self.registry.tree, running_here=self._running_here,
                          cancel_here=self._cancel_here, drain=self.set_draining,
                          flow_limits=self.limits_for, observer=self.observer,
                          reload=self.reload, pauses=lambda: self.pauses,
                          max_args_bytes=limits.max_args_bytes,
                          list_field_bytes=limits.list_field_bytes,
                          queues=lambda: set(self._dispatcher_boxes),
                          declared=lambda: set(self.config.queues), live_s=self._live_s())
        await self._refresh_pauses()
        sock = socket_path(self.config, self.state_dir)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(root.run)
            listener = await open_listener(sock, self.config.control.socket_group)
            server = ControlServer(control, max_connections=self.config.control.max_connections,
                                   max_line=self.config.limits.max_frame_bytes,
                                   on_drop=lambda reason: self.metrics.control_dropped.inc((reason,)))
            nursery.start_soon(server.serve, listener)
            http = await self._start_http(nursery, control)
            channels = ["jobd_enqueued", "jobd_cancel", "jobd_paused", "jobd_schedules"]
            for channel in channels:
                self.metrics.notifications_dropped.ensure((channel,))
            async with self.store.listen(channels) as notifications:
                nursery.start_soon(self._route_notifications, notifications)
                self.ready = True
                self.notifier.ready(self._status_line())
                log.info("jobd %s ready (daemon %s, region %s, socket %s)", __version__, self.id,
                         self.config.region, sock, extra={"event": "daemon.ready"})
                await self._stop.wait()
                await self._drain()
                # Each child has its own shutdown timeout (the completer's is the longest);
                # this bounds the whole, whatever the database does.
                with trio.move_on_after(_ROOT_STOP_S) as stopping:
                    await root.stop()
                if stopping.cancelled_caught:
                    log.warning("the actors did not stop within %ds; cancelling them",
                                _ROOT_STOP_S, extra={"event": "daemon.stop_timeout"})
                self._report_unwritten()
                if http is not None:
                    with trio.move_on_after(_HTTP_STOP_S):
                        await http.stop()
            nursery.cancel_scope.cancel()
        sock.unlink(missing_ok=True)
        try:
            with trio.move_on_after(3):  # a hung database must not hold the exit
                await self.store.deregister_daemon(self.id)
        except StoreUnavailable as exc:
            log.warning("could not deregister (the daemons row ages out): %s", exc,
                        extra={"event": "daemon.deregister_failed"})

    def _report_unwritten(self) -> None:
        """Say what the database never got. Those jobs are still `running` there under
        this daemon's leases, which lapse within jobs.lease; then any daemon's reaper
        hands them back (at-least-once: an attempt that finished here runs again)."""
        if not self._unwritten:
            return
        released = sum(1 for o in self._unwritten.values() if error_class(o.error) == "interrupted")
        outcomes = len(self._unwritten) - released
        log.error("stopped with %d finished attempts and %d releases not written to the "
                  "database; their leases lapse within %s and the jobs are rescued",
                  outcomes, released, self.config.jobs.lease,
                  extra={"event": "daemon.unwritten", "outcomes": outcomes,
                         "releases": released,
                         "jobs": sorted({job_id for job_id, _ in self._unwritten})[:100]})

    async def _drain(self) -> None:
        self.draining = True
        self.ready = False
        self.notifier.stopping("draining")
        log.info("draining", extra={"event": "daemon.draining"})
        for box in self._dispatcher_boxes.values():
            await box.tell(Drain())
        grace = self.config.daemon.drain_grace
        with trio.move_on_after(grace):
            while any(d.busy for d in self.dispatchers.values()):  # noqa: ASYNC110 - once, at shutdown
                await trio.sleep(0.05)
        left = sum(d.running for d in self.dispatchers.values())
        if left:
            log.warning("drain grace over; releasing %d running jobs", left,
                        extra={"event": "daemon.released", "jobs": left})
            for box in self._dispatcher_boxes.values():
                await box.tell(Release())
            with trio.move_on_after(10):
                while any(d.running for d in self.dispatchers.values()):  # noqa: ASYNC110
                    await trio.sleep(0.05)

    async def set_draining(self, draining: bool) -> c.DrainResult:
        """`jobctl drain`: stop claiming here (for a deploy) without stopping the daemon."""
        self.draining = draining
        for box in self._dispatcher_boxes.values():
            await box.tell(Drain(undo=not draining))
        self.notifier.status(self._status_line())
        log.info("draining" if draining else "claiming again",
                 extra={"event": "daemon.draining" if draining else "daemon.undrained"})
        return c.DrainResult(daemon_id=self.id, draining=draining)

    async def _refresh_pauses(self) -> None:
        assert self.store is not None
        try:
            self.pauses = set(await self.store.list_pauses())
        except StoreUnavailable:
            return  # the LISTEN reconnect refreshes again
        for box in self._dispatcher_boxes.values():
            try:
                box.tell_nowait(Wake())
            except (trio.WouldBlock, MailboxClosed):
                pass  # busy (it claims again anyway) or restarting (it starts by claiming)

    def _paused(self, queue: str) -> tuple[bool, list[str]]:
        keys = [k for q, k in self.pauses if q == queue]
        return "" in keys, [k for k in keys if k]

    async def _signals(self, signals: Any, nursery: trio.Nursery) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                # In its own task: a slow reload must not hold up a SIGTERM behind it.
                nursery.start_soon(self._reload_on_signal)
            else:
                log.info("got %s", signal.Signals(signum).name, extra={"event": "daemon.signal"})
                self._stop.set()

    # -- the tree ------------------------------------------------------------------------

    def _build_tree(self) -> Supervisor:
        store, clock, cfg = self.store, self.clock, self.config
        assert store is not None
        jobs = cfg.jobs
        lease_s = jobs.lease
        self._completer_box: Mailbox[Outcome] = Mailbox("completer", capacity=20_000)
        progress_box: Mailbox[ProgressUpdate] = Mailbox("progress", capacity=20_000)
        heart_box: Mailbox[Beat] = Mailbox("heart", capacity=16)
        reaper_box: Mailbox[Sweep] = Mailbox("reaper", capacity=16)
        self._scheduler_box: Mailbox[SchedulerMsg] = Mailbox("scheduler", capacity=64)

        def key_failures(queue: str, key: str, failures: int) -> None:
            threshold = self._breaker_threshold(queue, key)
            if threshold is not None and failures == threshold:
                self.observer.breaker_opened(queue, key)
                log.warning("breaker opened for %s key %s after %d failures", queue, key,
                            failures, extra={"event": "flow.breaker_opened", "queue": queue,
                                             "key": key})

        async def finish(batch: list[Outcome]) -> None:
            await store.finish_many(batch, key_failures)
            if any(o.state in ("available", "scheduled") for o in batch):
                # A retry or snooze was just written and no NOTIFY announces it: let the
                # dispatchers look again (next_due then sleeps them until its run_at).
                for box in self._dispatcher_boxes.values():
                    try:
                        box.tell_nowait(Wake())
                    except trio.WouldBlock:
                        pass  # a full mailbox means it is busy; it will claim again anyway

        async def write_progress(batch: list[ProgressUpdate]) -> None:
            latest = {u.id: u for u in batch}  # the newest update per job wins
            await store.write_progress(list(latest.values()), lease_s)

        def report_progress(job_id: int, token: int, pct: float | None, note: str | None) -> None:
            try:
                progress_box.tell_nowait(ProgressUpdate(job_id, token, pct, note))
            except (trio.WouldBlock, MailboxClosed):
                pass  # progress is advisory; a full (or closing) mailbox drops it, never the job

        retention = [
            RetentionRule(state, getattr(jobs.retention, f"{state}_max_age"),
                          getattr(jobs.retention, f"{state}_max_count"))
            for state in ("completed", "failed", "cancelled")
        ]
        runner = AttemptRunner(
            handlers=self.handlers, clock=clock, report_progress=report_progress, transaction=store.transaction,
            default_timeout_s=jobs.max_runtime or None,
            queue_timeout_s=self.queue_timeout_s,
            max_result_bytes=cfg.limits.max_result_bytes,
            progress_every_items=jobs.progress_every_items,
            progress_every_s=jobs.progress_every,
            snooze_burns_attempt=jobs.snooze_burns_attempt,
            enqueue_children=store.enqueue_children, steps=store,
        )
        pools = []
        for queue in self.queue_names():
            qcfg = cfg.queue(queue)
            box: Mailbox[DispatcherMsg] = Mailbox(f"pool:{queue}", capacity=1000)
            settings = QueueSettings(queue=queue, concurrency=qcfg.concurrency,
                                     claim_batch=qcfg.claim_batch, lease_s=lease_s,
                                     poll_interval_s=jobs.poll_interval,
                                     limits=self.limits_for(queue), recheck_s=_recheck_s(qcfg))
            self._dispatcher_boxes[queue] = box
            pools.append(ChildSpec.for_actor(self._dispatcher_factory(box, settings, runner)))
        children = [
            # Outcomes already handed over must reach the database before we exit.
            ChildSpec.for_actor(lambda: Batcher(self._completer_box, finish, clock=clock,
                                                max_items=2000, backlog=self._completer_backlog,
                                                reject=refused_outcome, settled=self._written),
                                stop=Batcher.stopper(self._completer_box), shutdown_timeout=15),
            ChildSpec.for_actor(lambda: Batcher(progress_box, write_progress, clock=clock,
                                                max_items=2000, max_wait_s=0.25,
                                                backlog=self._progress_backlog),
                                stop=Batcher.stopper(progress_box), shutdown_timeout=5),
            ChildSpec.for_actor(lambda: Heart(
                heart_box, store, daemon_id=self.id, lease_s=lease_s,
                interval_s=min(cfg.daemon.heartbeat, lease_s / 3),
                status=lambda: (self._status_line(), self.draining),
                running=self._lease_ids,
                cancel=self._cancel_nowait, lease_lost=self._lease_lost_nowait, clock=clock)),
            ChildSpec.for_actor(lambda: Reaper(
                reaper_box, store, ReaperSettings(
                    interval_s=jobs.reaper_interval,
                    timeout_grace_s=jobs.timeout_grace,
                    retention=retention, aging=self._aging_rules(), max_hold_s=4 * lease_s,
                    events_max_age_s=jobs.retention.events_max_age),
                observer=self.observer, clock=clock, hold=self._rescue_hold)),
            ChildSpec.for_actor(lambda: Scheduler(
                self._scheduler_box, store, SchedulerSettings(),
                handlers=self.handlers, config_schedules=lambda: self.config.schedules,
                observer=self.observer, clock=clock)),
            ChildSpec.for_supervisor(Supervisor(
                "pools", pools, Strategy.ONE_FOR_ONE, registry=self.registry,
                on_restart=self.observer.actor_restarted)),
        ]
        return Supervisor("root", children, Strategy.REST_FOR_ONE, max_restarts=5,
                          max_seconds=30, registry=self.registry,
                          on_restart=self.observer.actor_restarted)

    def _dispatcher_factory(self, box: Mailbox[DispatcherMsg], settings: QueueSettings,
                            runner: AttemptRunner):
        def make() -> Dispatcher:
            assert self.store is not None
            dispatcher = Dispatcher(
                box, settings, daemon_id=self.id, store=self.store, runner=runner,
                finish=self._hand_over, finish_nowait=self._hand_over_nowait,
                kinds=self.handlers.kinds,
                paused=self._paused,
                observer=self.observer, clock=self.clock)
            self.dispatchers[settings.queue] = dispatcher
            return dispatcher

        return make

    # -- outcomes on their way to the database ---------------------------------------------

    async def _hand_over(self, outcome: Outcome) -> None:
        self._unwritten[outcome.id, outcome.token] = outcome
        try:
            await self._completer_box.tell(outcome)
        except BaseException:
            self._unwritten.pop((outcome.id, outcome.token), None)
            raise

    def _hand_over_nowait(self, outcome: Outcome) -> None:
        self._unwritten[outcome.id, outcome.token] = outcome
        try:
            self._completer_box.tell_nowait(outcome)
        except BaseException:
            self._unwritten.pop((outcome.id, outcome.token), None)
            raise

    def _written(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            self._unwritten.pop((outcome.id, outcome.token), None)

    def _lease_ids(self) -> list[tuple[int, int]]:
        """The (job, lease token) pairs whose leases the heart renews: attempts running
        here, and attempts that ended here but whose outcome is not written yet (an
        outage): nobody may rescue and re-run a job whose result we hold."""
        pairs = {a for d in self.dispatchers.values() for a in d.running_attempts()}
        pairs.update(self._unwritten)
        return list(pairs)

    def _rescue_hold(self) -> str | None:
        """Why the reaper must not rescue expired leases yet (None: it may).

        After an outage every lease may have lapsed, including those of jobs that
        finished here meanwhile. Rescue waits until this daemon's heart has renewed its
        leases since the last failed store call, and for two heartbeat intervals after
        it, so that the other live daemons have renewed theirs too.
        """
        store = self.store
        if store is None or store.unavailable_at is None:
            return None
        if store.renewed_at is None or store.renewed_at < store.unavailable_at:
            return "waiting for this daemon's leases to be renewed after the outage"
        beat = min(self.config.daemon.heartbeat,
                   self.config.jobs.lease / 3)
        if time.monotonic() - store.unavailable_at < 2 * beat:
            return "the database just came back; live daemons renew their leases first"
        return None

    def _key_gauges(self, rows: list[dict[str, Any]]) -> None:
        """Per-key running jobs, effective rate and breaker state, from the leader's query."""
        by_queue: dict[str, list[KeyStats]] = {}
        for row in rows:
            limits = self.limits_for(row["queue"])
            if limits is not None:
                by_queue.setdefault(row["queue"], []).append(key_stats(row, limits))
        for queue, stats in by_queue.items():
            self.observer.key_snapshot(
                queue, {k.key: k.running for k in stats},
                {k.key: k.effective_rate for k in stats if k.effective_rate is not None},
                {k.key: k.breaker != "closed" for k in stats})

    def _aging_rules(self) -> list[AgingRule]:
        return [AgingRule(name, q.aging, q.aging_floor)
                for name, q in self.config.queues.items() if q.aging is not None]

    def _breaker_threshold(self, queue: str, key: str) -> int | None:
        limits = self.limits_for(queue)
        return limits.for_key(key).breaker_failures if limits is not None else None

    def limits_for(self, queue: str) -> FlowLimits | None:
        """A queue's flow limits, derived from the config once (and again on reload): the
        finish path asks for them on every batch."""
        if queue not in self._limits:
            self._limits[queue] = self.config.queue(queue).flow_limits()
        return self._limits[queue]

    def queue_timeout_s(self, queue: str) -> float | None:
        """`queues.<name>.timeout`: an attempt's timeout when its kind sets none."""
        if queue not in self._timeouts:
            timeout = self.config.queue(queue).timeout
            self._timeouts[queue] = timeout
        return self._timeouts[queue]
    def _live_s(self) -> float:
        """A daemon whose heartbeat is older than this no longer counts as serving."""
        return max(30.0, 3 * self.config.daemon.heartbeat)

    async def _publish_queues_and_limits(self) -> None:
        """The queues served here (for enqueue warnings) and the limits for jobd.enqueue.

        Once, at start: a reload neither adds dispatchers nor changes [limits]."""
        assert self.store is not None
        try:
            await self.store.set_daemon_queues(self.id, sorted(self._dispatcher_boxes))
            await self.store.put_settings({"max_args_bytes": self.config.limits.max_args_bytes,
                                           "daemon_live_s": self._live_s()})
        except (StoreUnavailable, ValueRejected) as exc:
            log.warning("could not record this daemon's queues and limits: %s", exc,
                        extra={"event": "store.unavailable"})

    def queue_names(self) -> list[str]:
        declared = {d.queue for d in self.handlers.registered().values()}
        return sorted(declared | set(self.config.queues) | {"default"})

    # -- handlers, reload ------------------------------------------------------------------

    def import_handlers(self) -> None:
        """Import the configured modules at start; ConfigError names the one that failed
        (also when it raised SystemExit or KeyboardInterrupt: its failure, not ours)."""
        error = import_modules(self.config.handlers, reload=False)
        if error is not None:
            raise ConfigError(error)
        log.info("handlers: %s", ", ".join(self.handlers.kinds()) or "none",
                 extra={"event": "handlers.loaded"})

    async def reload(self) -> c.ReloadResult:
        """SIGHUP: re-read the file; log level, queue concurrency and handlers change live.

        All or nothing: a bad file or a handler module that fails to re-import (raising
        anything, SystemExit included) or takes longer than `handlers.import_timeout`
        refuses the reload, and the running config and handlers stay."""
        pending = self._handler_import
        if pending is not None and not pending.done.is_set():
            return self._refuse_reload(
                f"the handler import of an earlier reload is still running "
                f"({time.monotonic() - pending.started:.0f} s)")
        if self._reloading:
            return self._refuse_reload("another reload is in progress")
        self._reloading = True
        try:
            return await self._reload()
        finally:
            self._reloading = False

    def _refuse_reload(self, why: str) -> c.ReloadResult:
        log.error("reload refused, keeping the running config and handlers: %s", why,
                  extra={"event": "config.reload_failed"})
        self.notifier.ready(self._status_line())
        return c.ReloadResult(ok=False, message=f"refused, running config kept: {why}")

    async def _reload(self) -> c.ReloadResult:
        self.notifier.reloading()
        try:
            new = load(self.config_path)
        except ConfigError as exc:
            return self._refuse_reload(str(exc))
        # The import runs on a worker thread: a module that sleeps at import must not
        # stall the control socket, and one that raises SystemExit must not stop us.
        attempt = self._handler_import = _HandlerImport(new.handlers, self.handlers)
        timeout_s = new.handlers.import_timeout
        try:
            with trio.move_on_after(timeout_s):
                await trio.to_thread.run_sync(attempt.run, abandon_on_cancel=True)
        finally:
            if not attempt.done.is_set():
                attempt.abandon()  # timed out (or we are stopping): its registrations are undone
        if not attempt.done.is_set():
            return self._refuse_reload(
                f"handlers.modules: the re-import took longer than {timeout_s:g} s "
                "(handlers.import_timeout); abandoned, previous handlers kept")
        if attempt.error is not None:
            return self._refuse_reload(f"{attempt.error}; previous handlers kept")
        log.info("handlers: %s", ", ".join(self.handlers.kinds()) or "none",
                 extra={"event": "handlers.loaded"})
        from daemon.logs import set_level

        set_level(new.log.level)
        self.config.log = new.log
        self.config.queues = new.queues
        self._limits = {}
        self._timeouts = {}
        self.config.handlers = new.handlers
        self.config.schedules = new.schedules
        for queue, box in self._dispatcher_boxes.items():
            qcfg = new.queue(queue)
            await box.tell(Resize(qcfg.concurrency, self.limits_for(queue), _recheck_s(qcfg)))
        scheduler_box = getattr(self, "_scheduler_box", None)
        if scheduler_box is not None:
            await scheduler_box.tell(SyncConfig())
        log.info("config reloaded", extra={"event": "config.reloaded"})
        self.notifier.ready(self._status_line())
        return c.ReloadResult(ok=True, message="reloaded")

    async def _reload_on_signal(self) -> None:
        try:
            await self.reload()
        except Exception:  # noqa: BLE001 - a reload never stops the daemon
            log.exception("reload failed", extra={"event": "config.reload_failed"})

    # -- callbacks -------------------------------------------------------------------------

    async def _route_notifications(
        self, notifications: trio.MemoryReceiveChannel[tuple[str, str]]
    ) -> None:
        async for channel, payload in notifications:
            self._on_notify(channel, payload)

    def _on_notify(self, channel: str, payload: str) -> None:
        """A LISTEN notification. Anyone who can connect to the database can NOTIFY, so a
        payload is untrusted input: a malformed one is dropped and counted, and nothing
        here raises (a raise would end _route_notifications)."""
        try:
            if not _valid_payload(channel, payload):
                self._drop_notification(channel, payload, "malformed payload")
                return
            self._handle_notify(channel, payload)
        except Exception as exc:  # noqa: BLE001 - contained: one notification, never the daemon
            self._drop_notification(channel, payload, f"{type(exc).__name__}: {exc}")

    def _handle_notify(self, channel: str, payload: str) -> None:
        if channel == "jobd_paused" or (channel == "jobd_enqueued" and not payload):
            # Pauses changed somewhere (or we reconnected and may have missed it).
            self._refresh_pauses_soon()
        if channel == "jobd_enqueued":
            # An empty payload follows a (re)connect: anything may have been missed.
            if payload:
                box = self._dispatcher_boxes.get(payload)
                targets = [box] if box is not None else []
            else:
                targets = list(self._dispatcher_boxes.values())
            for box in targets:
                try:
                    box.tell_nowait(Wake())
                except (trio.WouldBlock, MailboxClosed):
                    pass  # a full mailbox means it is busy; it will claim again anyway
        elif channel == "jobd_cancel" and payload:
            self._cancel_nowait(int(payload))
        elif channel == "jobd_schedules":
            scheduler_box = getattr(self, "_scheduler_box", None)
            if scheduler_box is None:
                return
            try:
                scheduler_box.tell_nowait(Tick())
            except (trio.WouldBlock, MailboxClosed):
                pass  # a full mailbox already holds a pass to run

    def _refresh_pauses_soon(self) -> None:
        """One refresh at a time: a flood of jobd_paused notifications costs one query per
        refresh, not one task and one query each."""
        if self._nursery is None:
            return
        if self._pauses_refreshing:
            self._pauses_stale = True
            return
        self._pauses_refreshing = True
        self._nursery.start_soon(self._refresh_pauses_loop)

    async def _refresh_pauses_loop(self) -> None:
        # Runs in the daemon's own nursery, outside any supervisor: whatever goes wrong
        # costs this refresh (the next NOTIFY or reconnect refreshes again), not the daemon.
        try:
            while True:
                self._pauses_stale = False
                await self._refresh_pauses()
                if not self._pauses_stale:
                    return
        except Exception:  # noqa: BLE001 - contained: one refresh, never the daemon
            log.exception("refreshing the pauses failed", extra={"event": "pauses.refresh_failed"})
        finally:
            self._pauses_refreshing = False

    def _drop_notification(self, channel: str, payload: str, why: str) -> None:
        self.metrics.notifications_dropped.inc((channel,))
        self._notify_drops += 1
        now = time.monotonic()
        if now - self._notify_warned_at >= NOTIFY_WARN_EVERY_S:
            log.warning("dropped %d LISTEN notification(s) in the last %.0f s; latest on %s: "
                        "%s (payload %r)", self._notify_drops, NOTIFY_WARN_EVERY_S, channel, why,
                        payload[:80], extra={"event": "notify.dropped", "channel": channel})
            self._notify_warned_at = now
            self._notify_drops = 0

    def _cancel_nowait(self, job_id: int) -> None:
        for box in self._dispatcher_boxes.values():
            try:
                box.tell_nowait(CancelJob(job_id))
            except (trio.WouldBlock, MailboxClosed):
                pass  # the heart's next beat finds the request again

    def _lease_lost_nowait(self, job_id: int, token: int) -> None:
        for box in self._dispatcher_boxes.values():
            try:
                box.tell_nowait(LeaseLost(job_id, token))
            except (trio.WouldBlock, MailboxClosed):
                pass  # the next beat reports it again

    async def _cancel_here(self, job_id: int) -> None:
        self._cancel_nowait(job_id)

    def _running_here(self) -> dict[str, tuple[int, int]]:
        return {q: (d.running, d.settings.concurrency) for q, d in self.dispatchers.items()}

    def _status_line(self) -> str:
        running = sum(d.running for d in self.dispatchers.values())
        state = "draining" if self.draining else "ready"
        return f"{state}; {running} jobs running; region {self.config.region}"

    def _pong(self) -> c.Pong:
        return c.Pong(daemon_id=self.id, region=self.config.region, version=__version__,
                      ready=self.ready and bool(self.store and self.store.healthy),
                      draining=self.draining)

    # -- metrics and HTTP ----------------------------------------------------------------

    async def _start_http(self, nursery: trio.Nursery, control: Control) -> HttpServer | None:
        """The HTTP server and the database-derived gauges it serves, if `control.http` is
        set (None if not: nobody could scrape the gauges, so their queries are not run)."""
        assert self.store is not None
        binds = self.config.control.http
        if not binds:
            return None
        self.metrics.init_queues(self.queue_names())
        leader_interval_s = self.config.metrics.leader_interval
        leadership: Leadership[MetricsSession] = Leadership()
        await nursery.start(Peer(Mailbox("peer"), self.store.metrics_session, leadership,
                                 interval_s=leader_interval_s, clock=self.clock).run)
        await nursery.start(partial(
            run_queue_gauges, leadership, self.metrics, clock=self.clock,
            interval_s=leader_interval_s,
            key_gauges=self._key_gauges, key_limit=self.config.metrics.key_series_limit))
        cc = self.config.control
        app = HttpApp(control=control, metrics=self.metrics, readiness=self._readiness,
                      token=read_token(self.config), max_body=self.config.limits.max_frame_bytes,
                      read_timeout_s=cc.http_read_timeout)
        server = HttpServer(app, [binds] if isinstance(binds, str) else binds,
                            graceful_timeout_s=cc.http_graceful_timeout,
                            max_connections=cc.http_max_connections,
                            keep_alive_s=cc.http_keep_alive,
                            write_timeout_s=cc.http_write_timeout)
        try:
            urls = await nursery.start(server.run)
        except OSError as exc:
            raise ConfigError(f"control.http: cannot listen on {server.binds}: {exc}") from exc
        log.info("HTTP on %s", ", ".join(urls), extra={"event": "http.listening"})
        return server

    async def _readiness(self) -> str | None:
        if self.store is None or not self.store.healthy:
            return "database unavailable"
        if not await self.store.migrations_current():
            return "database schema is behind this daemon"
        if self.draining:
            return "draining"
        if not self.ready:
            return "starting"
        return None

    def _ready_now(self) -> bool:
        return self.ready and not self.draining and bool(self.store and self.store.healthy)


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


NOTIFY_WARN_EVERY_S = 60.0  # at most one "dropped notifications" warning a minute
_INT64_MAX = 2**63 - 1
_NAME_PAYLOAD = re.compile(r"[^\x00-\x1f\x7f]{1,255}")


def _valid_payload(channel: str, payload: str) -> bool:
    """What jobd itself sends: a queue name (enqueued, paused), a job id (cancel), a
    schedule name (schedules); empty after a (re)connect."""
    if not isinstance(payload, str):
        return False
    if payload == "":
        return True
    if channel == "jobd_cancel":
        return (payload.isascii() and payload.isdigit() and len(payload) <= 19
                and 0 < int(payload) <= _INT64_MAX)
    if channel in ("jobd_enqueued", "jobd_paused", "jobd_schedules"):
        return _NAME_PAYLOAD.fullmatch(payload) is not None
    return False
# The drain's bounds after the grace and the release: the actors (completer 15 s,
# progress 5 s, the rest at once), the HTTP server.
_ROOT_STOP_S = 25
_HTTP_STOP_S = 12


def _recheck_s(queue: Queue) -> float | None:
    """A limited claim looks again after one token's time (bounded to 10 ms .. 1 s)."""
    if queue.flow_limits() is None:
        return None
    rate = queue.fastest_rate()
    return min(1.0, max(0.01, 1.0 / rate)) if rate else 0.25
