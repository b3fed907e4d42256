"""Returns expired leases to the queue, enforces absolute timeouts, prunes finished jobs
old workflow events and idle flow keys.

Safe on every daemon at once: each statement takes its rows with SKIP LOCKED.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgspec
import trio
import trio.lowlevel

from actors.ports import Observer, Store, StoreUnavailable, ValueRejected
from actors.runtime.clock import Clock
from actors.runtime.mailbox import Actor, Mailbox

log = logging.getLogger("jobd.reaper")


class Sweep(msgspec.Struct, tag="sweep"):
    """Run one pass now (tests and `jobctl` use it; the timer sends it too)."""


class RetentionRule(msgspec.Struct):
    state: str
    max_age_s: float
    max_count: int


class AgingRule(msgspec.Struct):
    queue: str
    every_s: float  # one priority step per this long waited
    floor: int


class ReaperSettings(msgspec.Struct, kw_only=True):
    interval_s: float = 5.0
    timeout_grace_s: float = 60.0
    batch: int = 1000
    forget_daemons_after_s: float = 3600.0
    # A hold (see Reaper) lasts at most this long while the store answers, so that a
    # store failing now and then (a statement timing out) cannot starve rescue.
    max_hold_s: float = 120.0
    # A flow key with nothing available or running, idle this long, loses its row if it
    # is in its default state; its failure streak and slowed rate last forget_key_state.
    idle_key_after_s: float = 600.0
    forget_key_state_after_s: float = 3600.0
    retention: list[RetentionRule] = []
    events_max_age_s: float | None = None  # workflow events; None keeps them forever
    aging: list[AgingRule] = []


class SweepReport(msgspec.Struct):
    rescued: int = 0
    failed_on_rescue: int = 0
    timed_out: int = 0
    promoted: int = 0
    pruned: int = 0
    woken: int = 0  # waiting workflows whose wait was over (a missed wake-up, a timeout)
    pruned_events: int = 0
    keys_pruned: int = 0  # idle flow-key rows deleted
    failed_steps: list[str] = []  # steps Postgres refused a value in (see Reaper._contained)


class Reaper(Actor[Sweep]):
    def __init__(self, mailbox: Mailbox[Sweep], store: Store, settings: ReaperSettings,
                 *, observer: Observer, clock: Clock,
                 hold: Callable[[], str | None] | None = None):
        """`hold()` gives a reason not to rescue or expire running jobs on this pass
        (after an outage, until this daemon's leases are renewed), or None."""
        super().__init__(mailbox.name, mailbox)
        self._store = store
        self.settings = settings
        self._observer = observer
        self._clock = clock
        self._hold = hold
        self._held: str | None = None
        self._held_for = 0.0  # seconds of sweeps held while the store answered
        self._failing: set[str] = set()  # steps whose last run was refused

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(self.settings.interval_s):
                envelope = await self.mailbox.receive()
                await self.dispatch(envelope)
                continue
            try:
                await self.sweep()
            except StoreUnavailable as exc:
                log.warning("sweep skipped: %s", exc, extra={"event": "reaper.unavailable"})

    async def handle(self, msg: Sweep) -> SweepReport:
        return await self.sweep()

    async def sweep(self) -> SweepReport:
        """One pass; each step loops in small batches until it has nothing left.

        A step whose statement Postgres refuses for a value (a row no CHECK kept out)
        is logged, counted and left for the next pass; the other steps still run.
        """
        report = SweepReport()
        batch = self.settings.batch
        held = self._hold() if self._hold is not None else None
        if held is not None and self._held_for >= self.settings.max_hold_s:
            log.warning("rescue held for %.0fs (%s); rescuing anyway", self._held_for, held,
                        extra={"event": "reaper.hold_expired"})
            held = None
        if held != self._held:
            if held is not None:
                log.info("rescue held: %s", held, extra={"event": "reaper.rescue_held"})
            self._held = held
        if held is None:
            self._held_for = 0.0
            with self._contained("rescue", report):
                while swept := await self._store.rescue_expired(batch):
                    for row in swept:
                        self._observer.jobs_rescued(row.queue, row.kind, 1)
                    report.rescued += len(swept)
                    report.failed_on_rescue += sum(1 for r in swept if r.state == "failed")
                    if len(swept) < batch:
                        break
            with self._contained("expire", report):
                while overdue := await self._store.expire_overdue(
                        batch, self.settings.timeout_grace_s):
                    report.timed_out += len(overdue)
                    if len(overdue) < batch:
                        break
        with self._contained("promote", report):
            report.promoted = await self._store.promote_due(batch * 10)
        with self._contained("wake", report):
            report.woken = len(await self._store.wake_waiting(batch * 10))
        for aging in self.settings.aging:
            with self._contained("age", report):
                await self._store.age_priorities(aging.queue, aging.every_s, aging.floor, batch)
        for retention in self.settings.retention:
            with self._contained("prune", report):
                while True:
                    n = await self._store.prune_finished(retention.state, retention.max_age_s,
                                                         retention.max_count, batch)
                    report.pruned += n
                    if n < batch:
                        break
                    await trio.lowlevel.checkpoint()  # let the daemon breathe between batches
        with self._contained("prune_events", report):
            while self.settings.events_max_age_s is not None:
                n = await self._store.prune_events(self.settings.events_max_age_s, batch)
                report.pruned_events += n
                if n < batch:
                    break
                await trio.lowlevel.checkpoint()
        with self._contained("prune_event_keys", report):
            while True:  # idempotency keys past their window (events.dedup_window)
                n = await self._store.prune_event_keys(batch)
                if n < batch:
                    break
                await trio.lowlevel.checkpoint()
        with self._contained("prune_keys", report):
            while True:
                n = await self._store.prune_idle_keys(batch, self.settings.idle_key_after_s,
                                                      self.settings.forget_key_state_after_s)
                report.keys_pruned += n
                if n < batch:
                    break
                await trio.lowlevel.checkpoint()
        with self._contained("forget_daemons", report):
            await self._store.forget_dead_daemons(self.settings.forget_daemons_after_s)
        if held is not None:
            self._held_for += self.settings.interval_s  # this pass reached the database
        if report.rescued or report.timed_out:
            log.info("rescued %d, timed out %d", report.rescued, report.timed_out,
                     extra={"event": "reaper.swept", **msgspec.structs.asdict(report)})
        return report

    @contextmanager
    def _contained(self, step: str, report: SweepReport) -> Iterator[None]:
        """Contain a ValueRejected (asyncpg DataError, CHECK violation) from one step."""
        try:
            yield
        except ValueRejected as exc:
            report.failed_steps.append(step)
            self._observer.maintenance_error("reaper", step)
            if step not in self._failing:  # once while it keeps failing, not every pass
                self._failing.add(step)
                log.error("reaper step %s failed, the others go on: %s", step, exc,
                          exc_info=exc, extra={"event": "reaper.step_failed", "step": step})
        else:
            if step in self._failing:
                self._failing.discard(step)
                log.info("reaper step %s works again", step,
                         extra={"event": "reaper.step_recovered", "step": step})
