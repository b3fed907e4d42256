"""The long-lived worker tasks a dispatcher runs its attempts on (at most one per slot),
fed from a queue of claimed attempts.

A task per attempt costs a spawn, a first scheduling pass and an exit per job: a third
of the daemon's time with short jobs. A worker takes the next attempt without a
scheduling pass, so a batch of quick jobs runs back to back; it yields to the rest of
the daemon every `_RUN_BEFORE_YIELD` attempts that did not.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import trio

from actors.services.worker import Attempt

# Quick attempts a worker runs in a row before it lets other tasks in.
_RUN_BEFORE_YIELD = 64


class WorkerTasks:
    def __init__(self, nursery: trio.Nursery, slots: Callable[[], int],
                 run: Callable[[Attempt], Awaitable[None]]):
        """`slots()`: how many workers may run now (a reload can shrink it)."""
        self._nursery = nursery
        self._slots = slots
        self._run = run
        self.ready: deque[Attempt] = deque()  # claimed, waiting for a worker
        self._idle_workers = trio.lowlevel.ParkingLot()
        self._workers = 0
        self._spare = 0  # workers woken or started that have not looked at `ready` yet
        self._inside = 0  # workers inside an attempt (blocked in it, when another runs)

    @property
    def workers(self) -> int:
        return self._workers

    def wake_one(self) -> None:
        """Have one worker on its way to the queued attempts, and only one.

        Waking a worker per attempt would cost a scheduling pass each, and most would
        find the queue already emptied by the first. Instead every worker that takes an
        attempt leaves the next one awake: if its job blocks, that one starts the
        next attempt (and wakes more, see _worker); if its job is quick, it runs the
        next itself.
        """
        self._wake(1)

    def _wake(self, spares: int) -> None:
        """Have up to `spares` workers on their way, never more than attempts queued."""
        while self._spare < min(spares, len(self.ready)):
            if len(self._idle_workers):
                self._idle_workers.unpark(count=1)
            elif self._workers < self._slots():
                self._workers += 1
                self._nursery.start_soon(self._worker)
            else:
                return  # every slot's worker is busy; the first to finish takes the next
            self._spare += 1

    async def _worker(self) -> None:
        in_a_row = 0
        counted = True
        try:
            while True:
                self._spare -= 1  # woken (or started) by wake_one, now looking
                # Attempts still queued while another worker is inside an attempt: that
                # one blocked in its job (a workflow's step, a sleep, I/O), and so may
                # the next ones. One spare per scheduling pass would start a claim of
                # 200 such jobs over 200 passes; two more per looking worker double the
                # starts every pass.
                ramp = self._spare + 2 if self.ready and self._inside else 1
                while self.ready and self._workers <= self._slots():
                    attempt = self.ready.popleft()
                    self._wake(ramp)
                    ramp = 1
                    self._inside += 1
                    try:
                        await self._run(attempt)
                    finally:
                        self._inside -= 1
                    in_a_row += 1
                    if in_a_row >= _RUN_BEFORE_YIELD:
                        in_a_row = 0
                        await trio.lowlevel.checkpoint()
                if self._workers > self._slots():
                    # The queue shrank (reload): retire, and hand what is queued to a
                    # parked worker, which takes it or retires and passes it on.
                    self._workers -= 1
                    counted = False
                    self.wake_one()
                    return
                in_a_row = 0
                await self._idle_workers.park()
        finally:
            if counted:
                self._workers -= 1
