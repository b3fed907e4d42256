"""One dispatcher per queue: claims batches while slots are free and runs each attempt.

Woken by NOTIFY (through `Wake`), by a slot freeing up, or by the next delayed job
coming due; polling is only the fallback for a lost notification.

Attempts run on long-lived worker tasks, at most one per slot
(`actors/services/worker_tasks.py`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from actors.flow import FlowLimits
from actors.ports import Observer, Outcome, Store, StoreUnavailable
from actors.runtime.clock import Clock
from actors.runtime.mailbox import Actor, Mailbox
from actors.services.attempt_run import run_and_hand_over
from actors.services.worker import (
    CANCEL_REQUESTED,
    LEASE_LOST,
    SHUTDOWN,
    Attempt,
    AttemptRunner,
)
from actors.services.worker_tasks import WorkerTasks

log = logging.getLogger("jobd.dispatcher")


# A job that came due right after a claim, or that another daemon's claim holds for a
# moment, is looked at again this soon.
_RECLAIM_S = 0.01


class Wake(msgspec.Struct, tag="wake"):
    """Jobs may be claimable now."""


class CancelJob(msgspec.Struct, tag="cancel_job"):
    job_id: int


class LeaseLost(msgspec.Struct, tag="lease_lost"):
    """The heart could not renew this attempt's lease: stop it now (its finish is fenced)."""

    job_id: int
    token: int


class Drain(msgspec.Struct, tag="drain"):
    """Stop claiming (or, with undo, start again); running attempts go on."""

    undo: bool = False


class Release(msgspec.Struct, tag="release"):
    """Stop every running attempt and hand its job back (end of the drain grace)."""


class Resize(msgspec.Struct, tag="resize"):
    """New local slots and flow limits (config reload)."""

    concurrency: int
    limits: FlowLimits | None = None
    recheck_s: float | None = None


class Running(msgspec.Struct, tag="running"):
    """Ask: how many attempts are running here."""


DispatcherMsg = Wake | CancelJob | LeaseLost | Drain | Release | Resize | Running


class QueueSettings(msgspec.Struct, kw_only=True):
    queue: str
    concurrency: int
    claim_batch: int
    lease_s: float
    poll_interval_s: float
    limits: FlowLimits | None = None  # flow control (jobd.claim_flow), None = off
    recheck_s: float | None = None  # how soon a limited claim looks again


class Dispatcher(Actor[DispatcherMsg]):
    def __init__(
        self,
        mailbox: Mailbox[DispatcherMsg],
        settings: QueueSettings,
        *,
        daemon_id: str,
        store: Store,
        runner: AttemptRunner,
        finish: Callable[[Outcome], Awaitable[None]],
        finish_nowait: Callable[[Outcome], None],
        kinds: Callable[[], list[str]],
        paused: Callable[[str], tuple[bool, list[str]]],
        observer: Observer,
        clock: Clock,
        on_idle: Callable[[], None] = lambda: None,
    ):
        """`on_idle()`: nothing runs here and no claim is in flight (a drain waits for it)."""
        super().__init__(mailbox.name, mailbox)
        self.settings = settings
        self._daemon_id = daemon_id
        self._store = store
        self._runner = runner
        self._finish = finish
        self._finish_nowait = finish_nowait  # raises trio.WouldBlock when the completer is full
        self._kinds = kinds
        self._paused = paused
        self._observer = observer
        self._clock = clock
        self._on_idle = on_idle
        # Claimed here and not yet finished, by (job id, lease token): after a lapsed
        # lease the same job can be claimed again while its old attempt still runs.
        self._attempts: dict[tuple[int, int], Attempt] = {}
        self._by_job: dict[int, Attempt] = {}  # the newest attempt of each job
        # Threads of sync handlers; held until a thread really ends, even an abandoned one.
        self._threads = trio.CapacityLimiter(max(1, settings.concurrency))
        self._wake = trio.Event()
        self._draining = False
        self._claiming = False

    @property
    def running(self) -> int:
        return len(self._attempts)

    @property
    def busy(self) -> bool:
        """Attempts run here, or a claim is in flight: its jobs are ours once it returns,
        so a drain that stopped before them would leave them `running` until the lease
        lapses."""
        return self._claiming or bool(self._attempts)

    def running_attempts(self) -> list[tuple[int, int]]:
        """(job id, lease token) of every attempt here, for the heart to renew."""
        return list(self._attempts)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._tasks = WorkerTasks(nursery, lambda: self.settings.concurrency,
                                          self._run_attempt)
                nursery.start_soon(self._claim_loop)
                task_status.started()
                async for envelope in self.mailbox:
                    await self.dispatch(envelope)
                nursery.cancel_scope.cancel()
        finally:
            # A dispatcher that dies takes its attempts with it; their leases lapse and
            # the reaper hands the jobs back, so nothing is lost.
            self._attempts.clear()
            self._by_job.clear()
            self._on_idle()

    async def handle(self, msg: DispatcherMsg) -> Any:
        if isinstance(msg, Wake):
            self._wake.set()
        elif isinstance(msg, CancelJob):
            attempt = self._by_job.get(msg.job_id)
            if attempt is None:
                return False
            while attempt is not None:
                attempt.stop(CANCEL_REQUESTED)
                attempt = attempt.after
            return True
        elif isinstance(msg, LeaseLost):
            lost = self._attempts.get((msg.job_id, msg.token))
            if lost is not None and lost.reason is None:
                log.warning("job %s lost its lease (token %s) while running; stopping that "
                            "attempt", msg.job_id, msg.token,
                            extra={"event": "job.lease_lost", "job_id": msg.job_id,
                                   "queue": self.settings.queue})
                lost.stop(LEASE_LOST)
        elif isinstance(msg, Drain):
            self._draining = not msg.undo
            self._wake.set()
        elif isinstance(msg, Release):
            self._draining = True
            for attempt in list(self._attempts.values()):
                attempt.stop(SHUTDOWN)
        elif isinstance(msg, Resize):
            self.settings.concurrency = msg.concurrency
            self.settings.limits = msg.limits
            self.settings.recheck_s = msg.recheck_s
            self._threads.total_tokens = max(1, msg.concurrency)
            self._wake.set()
        elif isinstance(msg, Running):
            return len(self._attempts)
        return None

    async def _claim_loop(self) -> None:
        self._backoff = 0.05
        while True:
            if self._draining:
                self._wake = trio.Event()
                await self._wait(math.inf)
                continue
            free = self.settings.concurrency - len(self._attempts)
            if free <= 0:
                self._wake = trio.Event()  # set again when a slot frees
                await self._wait(math.inf)
                continue
            queue_paused, paused_keys = self._paused(self.settings.queue)
            if queue_paused:
                self._wake = trio.Event()  # set by a resume (NOTIFY) or the poll timer
                await self._wait(self.settings.poll_interval_s)
                continue
            asked = min(free, self.settings.claim_batch)
            self._wake = trio.Event()
            self._claiming = True
            try:
                claimed = await self._store.claim(
                    self.settings.queue, asked, self._daemon_id, self.settings.lease_s,
                    self._kinds(), paused_keys=paused_keys, limits=self.settings.limits,
                )
            except StoreUnavailable as exc:
                self._claiming = False
                self._signal_idle()
                await self._back_off(exc)
                continue
            finally:
                # No checkpoint until the claimed jobs are attempts below.
                self._claiming = False
            self._backoff = 0.05
            if claimed:
                self._observer.claim_batch(self.settings.queue, len(claimed))
            # Start what we got before any other round trip: that is the latency users see.
            for job in claimed:
                attempt = Attempt(job, self._threads)
                old = self._by_job.get(job.id)
                if old is not None:
                    # Our lease on it lapsed (a stall) and we claimed it again: the old
                    # attempt must end before the new one starts.
                    log.warning("job %s claimed again while its attempt %s still runs here; "
                                "stopping the old one first", job.id, old.claimed.attempt,
                                extra={"event": "job.lease_lost", "job_id": job.id,
                                       "queue": job.queue})
                    old.stop(LEASE_LOST)
                    attempt.after = old
                self._attempts[attempt.key] = attempt
                self._by_job[job.id] = attempt
                self._tasks.ready.append(attempt)
            self._signal_idle()  # a claim that got nothing leaves the pool idle
            self._tasks.wake_one()
            if len(claimed) < asked:
                try:
                    due = await self._store.next_due(self.settings.queue, self._kinds(),
                                                     paused_keys)
                except StoreUnavailable as exc:
                    await self._back_off(exc)
                    continue
                await self._wait(self._idle_wait(due, bool(claimed)))
            # else: more may be waiting; claim again once a slot frees (the loop top).

    async def _back_off(self, exc: StoreUnavailable) -> None:
        log.warning("claim failed: %s", exc, extra={"event": "claim.unavailable",
                                                    "queue": self.settings.queue})
        await self._clock.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, 5.0)

    def _idle_wait(self, due: float | None, claimed_some: bool) -> float:
        """How long to sleep after a short claim (NOTIFY and freed slots wake us sooner).

        `due` is the seconds until the queue's next claimable job is due (None: none;
        paused keys are left out). A job due now that we did not get either came due
        between the claim and this query, or is held by another daemon's claim in
        flight, or, under flow control, by a limit: buckets refill and other daemons
        free key slots without telling us, so look again after one token's time.
        """
        poll = self.settings.poll_interval_s
        if due is None:
            return poll
        if due > 0:
            return min(poll, due)
        if claimed_some:
            return 0.0
        if self.settings.limits is not None:
            return min(poll, self.settings.recheck_s or poll)
        return min(poll, _RECLAIM_S)

    async def _wait(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._wake.wait()

    async def _run_attempt(self, attempt: Attempt) -> None:
        job = attempt.claimed
        try:
            if attempt.after is not None:
                await attempt.after.done.wait()  # never two attempts of one job at once
                attempt.after = None
            await run_and_hand_over(attempt, self._runner, self._observer,
                                    self._finish, self._finish_nowait)
        finally:
            self._attempts.pop(attempt.key, None)
            if self._by_job.get(job.id) is attempt:
                del self._by_job[job.id]
            attempt.done.set()
            self._wake.set()
            self._signal_idle()

    def _signal_idle(self) -> None:
        if not self.busy:
            self._on_idle()
