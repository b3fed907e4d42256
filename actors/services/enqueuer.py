"""Group commit for single enqueues: concurrent callers share one statement and one commit.

Accepts `enqueue(row) -> Enqueued`, one validated `NewJob` per caller (the control
plane's `Enqueue`, from the socket and HTTP alike), written by the store's
enqueue_many through the generic group commit (actors/services/group_commit.py: who
writes, what a refused row or an outage does to each caller, cancellation). A caller
cancelled after its row went into a write still has its job, as if the hang-up had
come just after the reply.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from actors.ports import Enqueued, NewJob
from actors.services.group_commit import MAX_ROWS, GroupCommit


class Enqueuer(GroupCommit[NewJob, Enqueued]):
    def __init__(self, write: Callable[[list[NewJob]], Awaitable[list[Enqueued]]],
                 *, max_rows: int = MAX_ROWS):
        """`write`: the store's enqueue_many (one statement, one result per row, in
        order). Statements are counted where every store call is (jobd_db_seconds,
        op="enqueue"): against jobd_jobs_enqueued_total that is the batch size."""
        super().__init__(write, what="enqueue", max_rows=max_rows)

    async def enqueue(self, row: NewJob) -> Enqueued:
        return await self.submit(row)
