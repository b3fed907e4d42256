"""The completer: every finished attempt reaches the database through here, in batches.

Messages it accepts (in its mailbox, handed over through `Outcomes`):
- `Outcome`: one attempt's end (completed, failed, a retry, a snooze, a release).
- the stop token of `Batcher.stopper`: write what was handed over before it, then end.

What it owns beyond the generic batching (`actors/services/batcher.py`): the finish
statement with its breaker events (a key whose consecutive failures reach its
breaker threshold is logged and counted once), waking the dispatchers after a retry
or snooze was written (no NOTIFY announces those), a refused outcome failing that one
attempt (`invalid_value`), and the outcomes handed over and not yet written, whose
leases the heart keeps renewing and which a stop reports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from actors.ports import Observer, Outcome, Store
from actors.runtime.clock import Clock
from actors.runtime.mailbox import Mailbox
from actors.services.batcher import Backlog, Batcher
from actors.services.outcomes import error_class, refused_outcome
from protocol.durations import format_duration

log = logging.getLogger("jobd.completer")


class Outcomes:
    """The hand-over point between the dispatchers and the completer.

    It outlives completer restarts (like the mailbox it holds): what was handed over
    and not yet written stays tracked by (job, lease token), so the heart renews those
    leases during an outage and a stop can say what the database never got.
    """

    def __init__(self, capacity: int = 20_000) -> None:
        self.mailbox: Mailbox[Outcome] = Mailbox("completer", capacity=capacity)
        self.backlog: Backlog[Outcome] = Backlog()
        self.unwritten: dict[tuple[int, int], Outcome] = {}

    async def hand_over(self, outcome: Outcome) -> None:
        """Waits while the completer is behind: that wait is the dispatchers' backpressure."""
        self.unwritten[outcome.id, outcome.token] = outcome
        try:
            await self.mailbox.tell(outcome)
        except BaseException:
            self.unwritten.pop((outcome.id, outcome.token), None)
            raise

    def hand_over_nowait(self, outcome: Outcome) -> None:
        """Raises trio.WouldBlock when the completer's mailbox is full."""
        self.unwritten[outcome.id, outcome.token] = outcome
        try:
            self.mailbox.tell_nowait(outcome)
        except BaseException:
            self.unwritten.pop((outcome.id, outcome.token), None)
            raise

    def written(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            self.unwritten.pop((outcome.id, outcome.token), None)

    def leases(self) -> list[tuple[int, int]]:
        """(job, lease token) of outcomes not yet written: nobody may rescue and re-run a
        job whose result this daemon holds."""
        return list(self.unwritten)

    def report_unwritten(self, lease_s: float) -> None:
        """Say what the database never got. Those jobs are still `running` there under
        this daemon's leases, which lapse within `lease_s`; then any daemon's reaper hands
        them back (at-least-once: an attempt that finished here runs again)."""
        if not self.unwritten:
            return
        released = sum(1 for o in self.unwritten.values() if error_class(o.error) == "interrupted")
        outcomes = len(self.unwritten) - released
        log.error("stopped with %d finished attempts and %d releases not written to the "
                  "database; their leases lapse within %s and the jobs are rescued",
                  outcomes, released, format_duration(lease_s),
                  extra={"event": "daemon.unwritten", "outcomes": outcomes,
                         "releases": released,
                         "jobs": sorted({job_id for job_id, _ in self.unwritten})[:100]})


class Completer(Batcher[Outcome]):
    """Writes handed-over outcomes in batches of up to 2000, at once when idle."""

    def __init__(
        self,
        outcomes: Outcomes,
        store: Store,
        *,
        breaker_threshold: Callable[[str, str], int | None],
        wake_dispatchers: Callable[[], None],
        observer: Observer,
        clock: Clock,
    ):
        super().__init__(outcomes.mailbox, self._finish, clock=clock, max_items=2000,
                         backlog=outcomes.backlog, reject=refused_outcome,
                         settled=outcomes.written)
        self._store = store
        self._breaker_threshold = breaker_threshold
        self._wake_dispatchers = wake_dispatchers
        self._observer = observer

    async def _finish(self, batch: list[Outcome]) -> None:
        await self._store.finish_many(batch, self._key_failures)
        if any(o.state in ("available", "scheduled") for o in batch):
            # A retry or snooze was just written and no NOTIFY announces it: let the
            # dispatchers look again (next_due then sleeps them until its run_at).
            self._wake_dispatchers()

    def _key_failures(self, queue: str, key: str, failures: int) -> None:
        threshold = self._breaker_threshold(queue, key)
        if threshold is not None and failures == threshold:
            self._observer.breaker_opened(queue, key)
            log.warning("breaker opened for %s key %s after %d failures", queue, key,
                        failures, extra={"event": "flow.breaker_opened", "queue": queue,
                                         "key": key})
