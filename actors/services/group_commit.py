"""Group commit: concurrent callers' rows share one statement and one commit.

Each statement through the bridge costs a round trip, a commit and ~0.3-0.6 ms of
daemon CPU whatever its size, so callers that arrive while a write is in flight wait
and go together in the next write (at most `max_rows`, and `max_bytes` by the rows'
`size`), the way Postgres' commit_delay groups commits. The first caller of an idle
window writes at once: an idle daemon adds no latency, and there is no timer. A caller
is answered once the statement holding its row has returned, i.e. committed.

Used for single enqueues (actors/services/enqueuer.py), for the steps of running
workflows (actors/services/step_writer.py) and, on asyncio, for the direct producer's
concurrent enqueues (daemon/producer.py): anyio's primitives, so it runs on either.

No task of its own: the caller that finds no write in flight leads (writes the waiting
rows, itself first), then hands the lead to the first caller still waiting. Each caller
gets its own outcome: `write` answers each row with its result or an exception for that
row alone (raised to its caller); a value Postgres refuses fails the whole statement,
so that batch is written again row by row and only the bad row's caller gets the error;
an unavailable store fails every caller of the batch (each retries as it would have). A
caller cancelled while waiting takes its row back, unless a write already holds it
(then the row is stored, as if the cancel had come just after the reply); a write in
flight is shielded (the connection's command timeout bounds it), so a leader's cancel
loses or duplicates no one else's row.

Under trio a waiting caller parks its own task and is rescheduled directly: an anyio
Event per caller (its trio Event and ParkingLot under it) took 4.8-5.0 us of CPU per
submit against 3.3-3.4 us this way (bench/group_commit_bench.py), and every single
enqueue and workflow step goes through here. Under asyncio, anyio's Event.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio
import trio

from actors.ports import StoreUnavailable

R = TypeVar("R")
T = TypeVar("T")

MAX_ROWS = 500


class _Caller(Generic[R, T]):
    __slots__ = ("row", "woken", "parked", "lead", "result", "error", "answered")

    def __init__(self, row: R, event: anyio.Event | None):
        self.row = row
        self.woken = event  # asyncio; under trio the caller's own task (`parked`)
        self.parked: trio.lowlevel.Task | None = None  # trio: waiting, until woken
        self.lead = False  # this caller writes the next batch
        self.result: T | None = None
        self.answered = False
        self.error: BaseException | None = None

    async def wait(self) -> None:
        if self.woken is not None:
            await self.woken.wait()
            return
        self.parked = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self.parked = None  # cancelled: nothing may reschedule it now
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def wake(self) -> None:
        """Idempotent, and a no-op for a caller that is running (a leader in its own
        batch, or one already woken and not yet run)."""
        if self.woken is not None:
            self.woken.set()
        elif self.parked is not None:
            task, self.parked = self.parked, None
            trio.lowlevel.reschedule(task)


class GroupCommit(Generic[R, T]):
    def __init__(self, write: Callable[[list[R]], Awaitable[Sequence[T | Exception]]],
                 *, what: str, max_rows: int = MAX_ROWS,
                 size: Callable[[R], int] | None = None, max_bytes: int = 0,
                 unavailable: tuple[type[Exception], ...] = (StoreUnavailable,)):
        """`write`: one statement for the rows, one answer per row in order (a result,
        or an exception that fails that row's caller only). `what` names the write in
        errors. `size` and `max_bytes` (0: no limit) bound a statement's payload; a row
        over it goes alone. `unavailable`: what `write` raises for an outage (every
        caller of the batch gets it; the rows are not tried one by one)."""
        self._write = write
        self._unavailable = unavailable
        self._what = what
        self._max_rows = max_rows
        self._size = size
        self._max_bytes = max_bytes
        self._waiting: list[_Caller[R, T]] = []
        self._busy = False  # a leader is writing, or has been named and not yet woken
        self._on_trio: bool | None = None  # known at the first submit
        self.writes = 0  # statements sent (row-by-row retries included)

    async def submit(self, row: R) -> T:
        if self._on_trio is None:
            self._on_trio = trio.lowlevel.in_trio_task()
        me: _Caller[R, T] = _Caller(row, None if self._on_trio else anyio.Event())
        self._waiting.append(me)
        if self._busy:
            try:
                await me.wait()
            except anyio.get_cancelled_exc_class():
                self._leave(me)
                raise
        else:
            self._busy = True
            me.lead = True
        if me.lead:
            await self._lead()
        if me.error is not None:
            raise me.error
        if not me.answered:  # the write ended in a BaseException (an interrupt)
            raise StoreUnavailable(f"{self._what}: the write did not finish")
        return me.result  # type: ignore[return-value]  # answered: a T

    def _leave(self, me: _Caller[R, T]) -> None:
        """A waiting caller cancelled: its row is not written, and a lead it was given
        passes on."""
        if me in self._waiting:
            self._waiting.remove(me)
        if me.lead:
            me.lead = False
            self._hand_off()

    def _hand_off(self) -> None:
        if self._waiting:
            nxt = self._waiting[0]
            nxt.lead = True
            nxt.wake()
        else:
            self._busy = False

    def _take(self) -> list[_Caller[R, T]]:
        n = min(len(self._waiting), self._max_rows)
        if self._size is not None and self._max_bytes:
            total = 0
            for i in range(n):
                total += self._size(self._waiting[i].row)
                if total > self._max_bytes:
                    n = max(i, 1)
                    break
        batch = self._waiting[:n]
        del self._waiting[:n]
        return batch

    async def _lead(self) -> None:
        # Taken with no checkpoint since the caller arrived, and written shielded: a
        # cancel of the leader must not drop the others' rows from a statement.
        batch = self._take()
        with anyio.CancelScope(shield=True):
            try:
                await self._write_batch(batch)
            finally:
                for caller in batch:
                    caller.lead = False
                    caller.wake()
                self._hand_off()

    async def _write_batch(self, batch: list[_Caller[R, T]]) -> None:
        self.writes += 1
        try:
            done = await self._write([c.row for c in batch])
        except self._unavailable as exc:
            for caller in batch:  # each its own copy: each caller raises and chains it
                caller.error = copy.copy(exc)
                caller.error.__cause__ = exc.__cause__
            return
        except Exception as exc:
            # A value Postgres refused (ValueRejected) fails the whole statement: find
            # whose it was by writing each row alone.
            if len(batch) == 1:
                batch[0].error = exc
                return
            for caller in batch:
                await self._write_batch([caller])
            return
        for caller, one in zip(batch, done, strict=True):
            if isinstance(one, Exception):
                caller.error = one
            else:
                caller.result = one
                caller.answered = True
