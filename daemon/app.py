"""The composition root: config in, store opened, the supervision tree built and run.

Order of life: signals are caught first (so SIGTERM always drains), then the
database (embedded or configured) is reached and migrated, the actors start, the
control socket opens, and only then READY=1. Stopping reverses it: drain the pools,
stop the tree (the completer writes what it was handed), close HTTP, deregister.

The tree (rest_for_one at the root: a child's crash restarts those after it):

    root
    ├── writers (one_for_one): completer, progress
    ├── heart, reaper, scheduler
    ├── pools (one_for_one): pool:<queue> ...
    ├── notifier
    └── courier        completion webhooks (last: its crash restarts nothing else)

Behaviour lives in the modules named here; this one only connects them.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

from actors import failure_hooks, validate
from actors.handlers import HANDLERS
from actors.http_handler import HttpCalls
from actors.ports import StoreUnavailable, ValueRejected
from actors.runtime import lag
from actors.runtime.clock import TrioClock
from actors.runtime.mailbox import Mailbox, MailboxClosed
from actors.runtime.registry import Registry
from actors.runtime.specs import ChildSpec, Strategy
from actors.runtime.supervisor import Supervisor
from actors.services.batcher import Batcher
from actors.services.callbacks import Callbacks
from actors.services.completer import Completer, Outcomes
from actors.services.control import Control
from actors.services.courier import Courier, CourierMsg, Deliver, Subscription, Sync
from actors.services.heart import Beat, Heart
from actors.services.notifier import CHANNELS, Notifier
from actors.services.outbound import Outbound
from actors.services.pools import Pools
from actors.services.progress import Progress, ProgressWriter
from actors.services.reaper import Reaper, ReaperSettings, RetentionRule, Sweep
from actors.services.scheduler import Scheduler, SchedulerMsg, SchedulerSettings, SyncConfig
from actors.services.step_writer import StepWriter
from actors.services.worker import AttemptRunner
from daemon import __version__, http_kinds, kind_tools, lifecycle, signals
from daemon.api.control_socket import ControlServer, open_listener
from daemon.api.http_server import HttpServer
from daemon.config import Config, ConfigError, socket_path, subscriptions
from daemon.metrics import Metrics
from daemon.queue_settings import QueueLimits, queue_names
from daemon.readiness import Readiness
from daemon.reload import Reloader, import_handlers
from daemon.serve_http import serve_http
from daemon.store import PgStore, bridge
from daemon.systemd import Notifier as Systemd
from daemon.systemd import run_watchdog
from daemon.tracing import traced

log = logging.getLogger("jobd.app")

# The drain's bounds after the grace and the release: the actors (completer 15 s,
# progress 5 s, the rest at once), the HTTP server.
_ROOT_STOP_S = 25
_HTTP_STOP_S = 12
# LISTEN notifications the listener may hold for the notifier; past it they are dropped
# (counted), and the notifier then acts as after a reconnect.
_NOTIFY_BUFFER = 10_000


class Daemon:
    def __init__(self, config: Config, config_path: Path | None, state_dir: Path,
                 systemd: Systemd):
        self.config = config
        self.state_dir = state_dir
        self.systemd = systemd
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.clock = TrioClock()
        self.registry = Registry()
        self.pools: Pools | None = None
        self.readiness = Readiness(
            self.id, config.region, draining=lambda: bool(self.pools and self.pools.draining),
            running=lambda: self.pools.running() if self.pools else 0)
        self.metrics = Metrics(
            version=__version__, region=config.region, daemon_id=self.id,
            running=lambda: self.pools.running_here() if self.pools else {},
            mailboxes=self.registry, ready=self.readiness.ready_now,
            key_series_limit=config.metrics.key_series_limit, keys=config.metrics.keys)
        self.observer = self.metrics.observer
        self.handlers = HANDLERS
        self.limits = QueueLimits(config)
        self.outcomes = Outcomes()
        self.progress = Progress()
        # One client for every HTTP kind (connection pools and limits per origin).
        self.http_calls = HttpCalls(
            Outbound(allow_hosts=config.http.allow_hosts,
                     follow_redirects=config.http.follow_redirects,
                     per_origin=config.http.per_origin,
                     max_body_bytes=config.limits.max_result_bytes),
            self.observer, callback_url=config.http.callback_url)
        self.reloader = Reloader(config, config_path, systemd, registry=self.handlers,
                                 apply=self._apply_reload,
                                 status_line=self.readiness.status_line,
                                 http_calls=self.http_calls)
        self._scheduler_box: Mailbox[SchedulerMsg] = Mailbox("scheduler", capacity=64)
        # Every request jobd sends out goes through this one client (README "Webhooks").
        self.outbound = Outbound(allow_hosts=config.http.allow_hosts,
                                 follow_redirects=config.http.follow_redirects,
                                 per_origin=config.http.per_origin)
        self._courier_box: Mailbox[CourierMsg] = Mailbox("courier", capacity=16)
        self.subscriptions: dict[str, Subscription] = subscriptions(config)
        self.metrics.webhooks.declare(self.subscriptions)
        self._stop = trio.Event()
        self._store: PgStore | None = None

    async def run(self) -> None:
        watchdog = lag.Watchdog(self.config.daemon.loop_lag_warning,
                                on_block=lambda kind, _s: self.metrics.loop_blocks.inc((kind or "",)))
        watchdog.start()
        try:
            with signals.receiver() as received:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(partial(signals.handle, received, nursery,
                                               reload=self.reloader.on_signal, stop=self._stop))
                    nursery.start_soon(lag.probe, self.clock, 0.5,
                                       partial(self.metrics.loop_lag.observe, ()))
                    interval = self.systemd.watchdog_interval()
                    if interval:
                        nursery.start_soon(run_watchdog, self.systemd, interval)
                    try:
                        async with traced(self.config.tracing, region=self.config.region,
                                          daemon_id=self.id):
                            await self._run_database()
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            watchdog.stop()
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self.http_calls.outbound.aclose()

    async def _run_database(self) -> None:
        db = self.config.database
        async with lifecycle.database_url(db.url, self.state_dir) as url:
            async with bridge.open_loop(on_error=self.observer.loop_error):
                store = PgStore(url, pool_min=db.pool_min, pool_max=db.pool_max,
                                timeout_s=db.timeout)
                store.observer = self.observer
                self.readiness.store = store
                try:
                    if await lifecycle.until_available(
                            partial(lifecycle.register, store, self.id, self.config.region),
                            self._stop, waiting=lambda exc: self.systemd.status(
                                f"waiting for the database: {exc}")):
                        await self._run_actors(store)
                finally:
                    await store.close()
                    await self.outbound.aclose()

    async def _run_actors(self, store: PgStore) -> None:
        cfg = self.config
        import_handlers(cfg.handlers, self.handlers)
        http_kinds.install(self.http_calls, self.handlers, http_kinds.prepare(cfg),
                           cfg.http.allow_hosts)
        tools = kind_tools.apply(self.handlers, cfg.kinds)
        validate.configure(cfg.limits.max_args_bytes)
        if not await lifecycle.until_available(lambda: store.sync_kind_tools(tools), self._stop):
            return
        # The database may go away right after connecting.
        if not await lifecycle.until_available(
                lambda: store.register_failure_hooks(failure_hooks.hooked_kinds(self.handlers)), self._stop):
            return
        # Before READY: a job finishing once the daemon is up has its rows written.
        if not await lifecycle.until_available(self._sync_webhooks(store), self._stop):
            return
        self._store = store
        if not await lifecycle.until_available(
                partial(lifecycle.sync_subscriptions, store, self.id, self.handlers,
                        lifecycle.live_s(cfg.daemon.heartbeat)), self._stop):
            return
        send, notifications = trio.open_memory_channel[tuple[str, str]](_NOTIFY_BUFFER)
        root, pools, notifier = self._build_tree(store, notifications)
        live_s = lifecycle.live_s(cfg.daemon.heartbeat)
        await lifecycle.publish(store, self.id, sorted(pools.queues),
                                max_args_bytes=cfg.limits.max_args_bytes, daemon_live_s=live_s,
                                event_dedup_s=cfg.events.dedup_window)
        control = Control(store, handlers=self.handlers, server=f"jobd/{__version__}", pong=self.readiness.pong,
                          tree=self.registry.tree, running_here=pools.running_here,
                          cancel_here=pools.cancel_here, drain=pools.set_draining,
                          flow_limits=self.limits.limits_for, observer=self.observer,
                          reload=self.reloader.reload, pauses=lambda: pools.pauses,
                          max_args_bytes=cfg.limits.max_args_bytes,
                          list_field_bytes=cfg.limits.list_field_bytes,
                          queues=lambda: pools.queues,
                          declared=lambda: set(cfg.queues), live_s=live_s,
                          wake_courier=self._wake_courier,
                          callbacks=Callbacks(store, self.http_calls,
                                              max_result_bytes=cfg.limits.max_result_bytes,
                                              observer=self.observer))
        await pools.refresh_pauses()
        sock = socket_path(cfg, self.state_dir)
        async with trio.open_nursery() as nursery:
            await nursery.start(root.run)
            listener = await open_listener(sock, cfg.control.socket_group)
            server = ControlServer(control, max_connections=cfg.control.max_connections,
                                   max_line=cfg.limits.max_frame_bytes,
                                   on_drop=lambda reason: self.metrics.control_dropped.inc((reason,)))
            nursery.start_soon(server.serve, listener)
            http = await serve_http(
                nursery, cfg, control=control, store=store, metrics=self.metrics,
                readiness=self.readiness, queues=queue_names(cfg, self.handlers),
                key_gauges=partial(self.limits.key_gauges, self.observer), clock=self.clock)
            for channel in CHANNELS:
                self.metrics.notifications_dropped.ensure((channel,))
            async with store.listen(CHANNELS, send, notifier.listener_full):
                self.readiness.started = True
                self.systemd.ready(self.readiness.status_line())
                log.info("jobd %s ready (daemon %s, region %s, socket %s)", __version__, self.id,
                         cfg.region, sock, extra={"event": "daemon.ready"})
                await self._stop.wait()
                await self._drain(root, pools, http)
            nursery.cancel_scope.cancel()
        sock.unlink(missing_ok=True)
        await lifecycle.deregister(store, self.id)

    async def _drain(self, root: Supervisor, pools: Pools, http: HttpServer | None) -> None:
        self.readiness.started = False
        self.systemd.stopping("draining")
        log.info("draining", extra={"event": "daemon.draining"})
        await pools.drain(self.config.daemon.drain_grace)
        # Each child has its own shutdown timeout (the completer's is the longest);
        # this bounds the whole, whatever the database does.
        with trio.move_on_after(_ROOT_STOP_S) as stopping:
            await root.stop()
        if stopping.cancelled_caught:
            log.warning("the actors did not stop within %ds; cancelling them",
                        _ROOT_STOP_S, extra={"event": "daemon.stop_timeout"})
        self.outcomes.report_unwritten(self.config.jobs.lease)
        if http is not None:
            with trio.move_on_after(_HTTP_STOP_S):
                await http.stop()

    def _sync_webhooks(self, store: PgStore) -> Callable[[], Awaitable[None]]:
        return lambda: store.sync_webhooks(
            self.id, [s.declared() for s in self.subscriptions.values()])

    async def _apply_reload(self) -> None:
        self.limits.forget()
        try:
            self.subscriptions = subscriptions(self.config)
        except ConfigError as exc:  # a secret file gone since the reload's own check
            log.error("webhooks not reloaded, the previous ones kept: %s", exc,
                      extra={"event": "config.reload_failed"})
        self.outbound.allow_hosts = list(self.config.http.allow_hosts)
        self.metrics.webhooks.declare(self.subscriptions)
        try:
            self._courier_box.tell_nowait(Sync())
        except (trio.WouldBlock, MailboxClosed):
            pass  # a full mailbox already holds a sync
        if self._store is not None:
            # The reload itself stands: should the database be away, the next start or
            # reload writes the subscriptions.
            try:
                await lifecycle.sync_subscriptions(
                    self._store, self.id, self.handlers,
                    lifecycle.live_s(self.config.daemon.heartbeat))
            except (StoreUnavailable, ValueRejected) as exc:
                log.warning("could not write the event subscriptions after the reload: %s",
                            exc, extra={"event": "events.subscriptions_failed"})
        if self._store is not None:
            tools = kind_tools.apply(self.handlers, self.config.kinds)  # checked by the reload
            try:
                await self._store.sync_kind_tools(tools)
            except (StoreUnavailable, ValueRejected) as exc:
                log.warning("could not publish the kinds' flow-control tools: %s", exc,
                            extra={"event": "store.unavailable"})
        if self.pools is not None:
            await self.pools.resize()
            await self._scheduler_box.tell(SyncConfig())

    def _wake_courier(self) -> None:
        try:
            self._courier_box.tell_nowait(Deliver())
        except (trio.WouldBlock, MailboxClosed):
            pass  # a full mailbox already holds a wake-up

    # -- the tree ------------------------------------------------------------------------

    def _build_tree(self, store: PgStore,
                    notifications: trio.MemoryReceiveChannel[tuple[str, str]],
                    ) -> tuple[Supervisor, Pools, Notifier]:
        cfg, clock, jobs = self.config, self.clock, self.config.jobs
        lease_s = jobs.lease
        beat_s = min(cfg.daemon.heartbeat, lease_s / 3)
        heart_box: Mailbox[Beat] = Mailbox("heart", capacity=16)
        reaper_box: Mailbox[Sweep] = Mailbox("reaper", capacity=16)
        runner = AttemptRunner(
            handlers=self.handlers, clock=clock, report_progress=self.progress.report, transaction=store.transaction,
            default_timeout_s=jobs.max_runtime or None,
            queue_timeout_s=self.limits.timeout_s,
            max_result_bytes=cfg.limits.max_result_bytes,
            progress_every_items=jobs.progress_every_items,
            progress_every_s=jobs.progress_every,
            snooze_burns_attempt=jobs.snooze_burns_attempt,
            enqueue_children=store.enqueue_children, steps=StepWriter(store),
        )
        pools = self.pools = Pools(
            queue_names(cfg, self.handlers), settings=self.limits.dispatcher_settings, daemon_id=self.id,
            store=store, runner=runner, outcomes=self.outcomes,
            kinds=self.handlers.kinds, observer=self.observer, clock=clock,
            status_changed=lambda: self.systemd.status(self.readiness.status_line()))
        notifier = Notifier(
            notifications, wake=pools.wake, cancel=pools.cancel_nowait,
            refresh_pauses=pools.refresh_pauses, scheduler=self._scheduler_box,
            count_drop=self.observer.notification_dropped, webhooks=self._wake_courier)
        retention = [
            RetentionRule(state, getattr(jobs.retention, f"{state}_max_age"),
                          getattr(jobs.retention, f"{state}_max_count"))
            for state in ("completed", "failed", "cancelled")
        ]
        # A `skipped` row (a flow-control tool refused the enqueue) never ran: it is kept
        # as long as a cancelled job.
        retention.append(RetentionRule("skipped", jobs.retention.cancelled_max_age,
                                       jobs.retention.cancelled_max_count))
        on_restart = self.observer.actor_restarted
        writers = Supervisor("writers", [
            # Outcomes already handed over must reach the database before we exit.
            ChildSpec.for_actor(lambda: Completer(
                self.outcomes, store, breaker_threshold=self.limits.breaker_threshold,
                wake_dispatchers=pools.wake, observer=self.observer, clock=clock),
                stop=Batcher.stopper(self.outcomes.mailbox), shutdown_timeout=15),
            ChildSpec.for_actor(lambda: ProgressWriter(self.progress, store, lease_s=lease_s,
                                                       clock=clock),
                                stop=Batcher.stopper(self.progress.mailbox), shutdown_timeout=5),
        ], Strategy.ONE_FOR_ONE, max_restarts=5, max_seconds=30, registry=self.registry,
            on_restart=on_restart)
        children = [
            ChildSpec.for_supervisor(writers),
            ChildSpec.for_actor(lambda: Heart(
                heart_box, store, daemon_id=self.id, lease_s=lease_s, interval_s=beat_s,
                status=lambda: (self.readiness.status_line(), pools.draining),
                running=pools.lease_ids, cancel=pools.cancel_nowait,
                lease_lost=pools.lease_lost_nowait, clock=clock)),
            ChildSpec.for_actor(lambda: Reaper(
                reaper_box, store, ReaperSettings(
                    interval_s=jobs.reaper_interval,
                    timeout_grace_s=jobs.timeout_grace,
                    retention=retention, aging=self.limits.aging_rules(), max_hold_s=4 * lease_s,
                    events_max_age_s=jobs.retention.events_max_age),
                observer=self.observer, clock=clock,
                hold=partial(lifecycle.rescue_hold, store, beat_s))),
            ChildSpec.for_actor(lambda: Scheduler(
                self._scheduler_box, store, SchedulerSettings(), handlers=self.handlers,
                config_schedules=lambda: cfg.schedules, observer=self.observer, clock=clock)),
            ChildSpec.for_supervisor(pools.supervisor(self.registry, on_restart)),
            ChildSpec("notifier", notifier.run),
            # A drain lets requests in flight end and their outcomes be written.
            ChildSpec.for_actor(lambda: Courier(
                self._courier_box, store, self.outbound, daemon_id=self.id,
                subscriptions=lambda: self.subscriptions, observer=self.metrics.webhooks,
                clock=clock), stop=Courier.stopper(self._courier_box), shutdown_timeout=12),
        ]
        root = Supervisor("root", children, Strategy.REST_FOR_ONE, max_restarts=5,
                          max_seconds=30, registry=self.registry, on_restart=on_restart)
        return root, pools, notifier
