"""Returns expired leases to the queue, enforces absolute timeouts, prunes finished jobs.

Safe on every daemon at once: each statement takes its rows with SKIP LOCKED.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec
import trio
import trio.lowlevel

from actors.clock import Clock
from actors.mailbox import Actor, Mailbox
from actors.ports import Observer, Store, StoreUnavailable

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
    retention: list[RetentionRule] = []
    aging: list[AgingRule] = []


class SweepReport(msgspec.Struct):
    rescued: int = 0
    failed_on_rescue: int = 0
    timed_out: int = 0
    promoted: int = 0
    pruned: int = 0
    woken: int = 0  # waiting workflows whose wait was over (a missed wake-up, a timeout)


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
        """One pass; each step loops in small batches until it has nothing left."""
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
        while held is None and (swept := await self._store.rescue_expired(batch)):
            for row in swept:
                self._observer.jobs_rescued(row.queue, row.kind, 1)
            report.rescued += len(swept)
            report.failed_on_rescue += sum(1 for r in swept if r.state == "failed")
            if len(swept) < batch:
                break
        while held is None and (
                overdue := await self._store.expire_overdue(batch, self.settings.timeout_grace_s)):
            report.timed_out += len(overdue)
            if len(overdue) < batch:
                break
        report.promoted = await self._store.promote_due(batch * 10)
        report.woken = len(await self._store.wake_waiting(batch * 10))
        for rule in self.settings.aging:
            await self._store.age_priorities(rule.queue, rule.every_s, rule.floor, batch)
        for rule in self.settings.retention:
            while True:
                n = await self._store.prune_finished(rule.state, rule.max_age_s, rule.max_count, batch)
                report.pruned += n
                if n < batch:
                    break
                await trio.lowlevel.checkpoint()  # let the daemon breathe between batches
        await self._store.forget_dead_daemons(self.settings.forget_daemons_after_s)
        if held is not None:
            self._held_for += self.settings.interval_s  # this pass reached the database
        if report.rescued or report.timed_out:
            log.info("rescued %d, timed out %d", report.rescued, report.timed_out,
                     extra={"event": "reaper.swept", **msgspec.structs.asdict(report)})
        return report
