"""Group commit for single enqueues: concurrent callers share one statement and one commit.

Accepts `enqueue(row) -> Enqueued`, one validated `NewJob` per caller (the control
plane's `Enqueue`, from the socket and HTTP alike). Each statement through the bridge
costs a round trip and a commit whatever its size, so callers that arrive while a write
is in flight wait and go together in the next write, at most `max_rows` per statement,
the way Postgres' commit_delay groups commits. The first caller of an idle window
writes at once: an idle daemon adds no latency, and there is no timer.

No task of its own: the caller that finds no write in flight leads (writes the waiting
rows, itself first), then hands the lead to the first caller still waiting. Each caller
gets its own outcome: a value Postgres refuses fails the statement, so that batch is
written again row by row and only the bad row's caller gets the error; an unavailable
store fails every caller of the batch (each retries as it would have). A caller
cancelled while waiting takes its row back, unless a write already holds it (then the
job exists, as if the hang-up had come just after the reply); a write in flight is
shielded (the connection's command timeout bounds it), so a leader's hang-up loses or
duplicates no one else's row.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from actors.ports import Enqueued, NewJob, StoreUnavailable

MAX_ROWS = 500


class _Caller:
    __slots__ = ("row", "woken", "lead", "result", "error")

    def __init__(self, row: NewJob):
        self.row = row
        self.woken = trio.Event()
        self.lead = False  # this caller writes the next batch
        self.result: Enqueued | None = None
        self.error: BaseException | None = None


class Enqueuer:
    def __init__(self, write: Callable[[list[NewJob]], Awaitable[list[Enqueued]]],
                 *, max_rows: int = MAX_ROWS):
        """`write`: the store's enqueue_many (one statement, one result per row, in
        order). Statements are counted where every store call is (jobd_db_seconds,
        op="enqueue"): against jobd_jobs_enqueued_total that is the batch size."""
        self._write = write
        self._max_rows = max_rows
        self._waiting: list[_Caller] = []
        self._busy = False  # a leader is writing, or has been named and not yet woken

    async def enqueue(self, row: NewJob) -> Enqueued:
        me = _Caller(row)
        self._waiting.append(me)
        if self._busy:
            try:
                await me.woken.wait()
            except trio.Cancelled:
                self._leave(me)
                raise
        else:
            self._busy = True
            me.lead = True
        if me.lead:
            await self._lead()
        if me.error is not None:
            raise me.error
        if me.result is None:  # the write ended in a BaseException (an interrupt)
            raise StoreUnavailable("enqueue: the write did not finish")
        return me.result

    def _leave(self, me: _Caller) -> None:
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
            nxt.woken.set()
        else:
            self._busy = False

    async def _lead(self) -> None:
        # Taken with no checkpoint since the caller arrived, and written shielded: a
        # cancel of the leader must not drop the others' rows from a statement.
        batch = self._waiting[:self._max_rows]
        del self._waiting[:self._max_rows]
        with trio.CancelScope(shield=True):
            try:
                await self._write_batch(batch)
            finally:
                for caller in batch:
                    caller.lead = False
                    caller.woken.set()
                self._hand_off()

    async def _write_batch(self, batch: list[_Caller]) -> None:
        try:
            done = await self._write([c.row for c in batch])
        except StoreUnavailable as exc:
            for caller in batch:  # each its own copy: each caller raises and chains it
                caller.error = type(exc)(*exc.args)
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
            caller.result = one
