"""Fires cron and interval schedules, exactly once per occurrence across all daemons.

Every daemon runs one. A pass reads the schedules and the database's clock, plans
each schedule's due occurrences (actors.schedule: DST rule, missed-run policy,
jitter) and fires them all in one statement, which inserts an occurrence's job only
if its (schedule, fire_at) row is new. Then it sleeps until the next occurrence, or
until a NOTIFY on `jobd_schedules` (a schedule was added, changed, paused) wakes it.

Delayed jobs need nothing from here: dispatchers claim `scheduled` jobs once due and
sleep until the queue's next run_at (woken early by the enqueue NOTIFY).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

import msgspec
import trio

from actors.errors import InvalidArgs, UnknownKind
from actors.handlers import Handlers
from actors.ports import (
    Fired,
    FireTarget,
    Observer,
    Occurrence,
    Store,
    StoreUnavailable,
    ValueRejected,
)
from actors.runtime.clock import Clock
from actors.runtime.mailbox import Actor, Mailbox
from actors.schedule import check_row, next_after, plan, timing_of
from actors.schedule_jobs import definition, occurrence
from protocol.schedules import ScheduleSpec

log = logging.getLogger("jobd.scheduler")


class Tick(msgspec.Struct, tag="tick"):
    """Look at the schedules now (NOTIFY on `jobd_schedules`, tests)."""


class SyncConfig(msgspec.Struct, tag="sync_config"):
    """Write the config file's schedules again (after SIGHUP), then tick."""


SchedulerMsg = Tick | SyncConfig


class SchedulerSettings(msgspec.Struct, kw_only=True):
    max_sleep_s: float = 60.0  # re-read schedules at least this often
    keep_fires_s: float = 7 * 86400.0
    prune_every_s: float = 600.0
    prune_batch: int = 1000


class TickReport(msgspec.Struct, kw_only=True):
    fired: int = 0
    skipped: int = 0  # missed occurrences dropped by policy (a lower bound)
    refused: int = 0  # schedules changed under us; the next pass sees the change
    broken: int = 0  # schedules skipped for a stored value out of range (logged once)
    next_in_s: float | None = None


class Scheduler(Actor[SchedulerMsg]):
    def __init__(
        self,
        mailbox: Mailbox[SchedulerMsg],
        store: Store,
        settings: SchedulerSettings,
        *,
        handlers: Handlers,
        config_schedules: Callable[[], list[ScheduleSpec]],
        observer: Observer,
        clock: Clock,
    ):
        super().__init__(mailbox.name, mailbox)
        self._store = store
        self._handlers = handlers
        self.settings = settings
        self._config_schedules = config_schedules
        self._observer = observer
        self._clock = clock
        self._warned: set[tuple[str, int]] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        synced = False
        backoff = 0.2
        next_prune = self._clock.now()
        while True:
            try:
                if not synced:
                    await self.sync_config()
                    synced = True
                # The next occurrence is relative to the clock read at the start of the
                # pass: sleep from then, not from after the fire, or each fire comes
                # late by the pass's own duration.
                started = self._clock.now()
                report = await self.tick()
                if self._clock.now() >= next_prune:
                    await self.prune()
                    next_prune = self._clock.now() + self.settings.prune_every_s
                wait = self.settings.max_sleep_s
                if report.next_in_s is not None:
                    # +1 ms: waking a hair early costs a whole extra pass.
                    wait = min(wait, report.next_in_s + 0.001)
                wait = max(0.0, started + wait - self._clock.now())
                backoff = 0.2
            except StoreUnavailable as exc:
                log.warning("scheduler pass skipped: %s", exc,
                            extra={"event": "scheduler.unavailable"})
                wait, backoff = backoff, min(backoff * 2, 5.0)
            with trio.move_on_after(wait):
                envelope = await self.mailbox.receive()
                # A burst of notifications is one pass.
                while True:
                    if isinstance(envelope.msg, SyncConfig):
                        synced = False
                    if envelope.reply is not None:
                        await self.dispatch(envelope)
                    try:
                        envelope = self.mailbox.receive_nowait()
                    except trio.WouldBlock:
                        break

    async def handle(self, msg: SchedulerMsg) -> TickReport:
        if isinstance(msg, SyncConfig):
            await self.sync_config()
        return await self.tick()

    async def sync_config(self) -> None:
        """Upsert the config file's schedules: the file wins for their definition."""
        declared = set()
        for spec in self._config_schedules():
            declared.add(spec.name)
            try:
                schedule = definition(self._handlers, spec, source="config")
            except (ValueError, UnknownKind, InvalidArgs) as exc:
                log.error("schedule %r from the config not written: %s", spec.name, exc,
                          extra={"event": "scheduler.config_invalid", "schedule": spec.name})
                continue
            try:
                await self._store.put_schedule(schedule, replace=True)
            except ValueRejected as exc:  # a CHECK stricter than this daemon's ranges
                log.error("schedule %r from the config not written: %s", spec.name, exc,
                          extra={"event": "scheduler.config_invalid", "schedule": spec.name})
                self._observer.maintenance_error("scheduler", "config")
        _, rows = await self._store.list_schedules()
        for row in rows:
            if row.source == "config" and row.name not in declared:
                # Other daemons may still declare it (rolling deploy): never delete here.
                log.warning("schedule %r came from a config file but is not in ours; it keeps "
                            "firing until `jobctl schedules remove %s`", row.name, row.name,
                            extra={"event": "scheduler.config_orphan", "schedule": row.name})

    async def tick(self, now: datetime | None = None) -> TickReport:
        """One pass: fire what is due at `now` (None: the database's clock)."""
        db_now, rows = await self._store.list_schedules(now)
        report = TickReport()
        targets: list[FireTarget] = []
        occurrences: list[Occurrence] = []
        next_at: datetime | None = None
        for row in rows:
            if row.paused:
                continue
            timing = timing_of(row)
            try:
                # Validated on the way in (and by a CHECK), so only a zone this machine
                # lacks, or a row that slipped in around both, gets here; one bad row
                # must not stop the others.
                check_row(row)
                p = plan(timing, row.handled_until, db_now, missed=row.missed,
                         missed_limit=row.missed_limit, grace_s=row.grace_s)
                upcoming = next_after(timing, max(db_now, row.handled_until))
            except (ValueError, OverflowError) as exc:  # OverflowError: date arithmetic
                self._broken(row.name, row.revision, f"schedule {row.name!r} skipped: {exc}")
                report.broken += 1
                continue
            if p.advance_to is not None:
                try:
                    built = [occurrence(self._handlers, row, t) for t in p.fire]
                except (UnknownKind, InvalidArgs) as exc:
                    # Another daemon (with this handler) fires it; if none does, the
                    # missed policy applies once one does.
                    self._warn(row.name, row.revision, f"schedule {row.name!r} not fired here: {exc}")
                    continue
                targets.append(FireTarget(row.name, row.revision, p.advance_to))
                occurrences += built
                report.skipped += p.skipped
            next_at = upcoming if next_at is None else min(next_at, upcoming)
        if targets:
            fired, refused = await self._fire(targets, occurrences, now, report)
            report.fired, report.refused = len(fired), len(refused)
            by_job = {(o.schedule, o.fire_at): o.job for o in occurrences}
            for f in fired:
                job = by_job.get((f.schedule, f.fire_at))
                if job is not None:
                    self._observer.jobs_enqueued(job.queue, job.kind, 1)
            if fired or report.skipped:
                log.debug("fired %d occurrences, skipped %d", report.fired, report.skipped,
                          extra={"event": "scheduler.fired", "fired": report.fired,
                                 "skipped": report.skipped})
            if refused:
                next_at = db_now  # re-read at once: a definition changed under us
        if next_at is not None:
            report.next_in_s = (next_at - db_now).total_seconds()
        return report

    async def _fire(self, targets: list[FireTarget], occurrences: list[Occurrence],
                    now: datetime | None, report: TickReport) -> tuple[list[Fired], set[str]]:
        """One statement for all; if Postgres refuses a value in it, one per schedule,
        so the schedule whose row it cannot store is skipped and the others fire."""
        try:
            return await self._store.fire_schedules(targets, occurrences, now)
        except ValueRejected as exc:
            if len(targets) == 1:
                self._broken(targets[0].name, targets[0].revision,
                             f"schedule {targets[0].name!r} not fired: Postgres refused "
                             f"a value of its job: {exc}")
                report.broken += 1
                return [], set()
        fired: list[Fired] = []
        refused: set[str] = set()
        for target in targets:
            mine = [o for o in occurrences if o.schedule == target.name]
            f, r = await self._fire([target], mine, now, report)
            fired += f
            refused |= r
        return fired, refused

    def _broken(self, name: str, revision: int, message: str, *, exc_info: bool = False
                ) -> None:
        self._observer.maintenance_error("scheduler", "schedule")
        self._warn(name, revision, message, exc_info=exc_info)

    def _warn(self, name: str, revision: int, message: str, *, exc_info: bool = False
              ) -> None:
        if (name, revision) not in self._warned:  # once per definition, not every pass
            self._warned.add((name, revision))
            log.warning("%s", message, exc_info=exc_info,
                        extra={"event": "scheduler.cannot_fire", "schedule": name})

    async def prune(self, now: datetime | None = None) -> int:
        pruned = 0
        while True:
            n = await self._store.prune_schedule_fires(
                self.settings.keep_fires_s, self.settings.prune_batch, now)
            pruned += n
            if n < self.settings.prune_batch:
                return pruned
            await trio.lowlevel.checkpoint()
