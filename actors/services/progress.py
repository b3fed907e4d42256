"""The progress writer: a handler's `ctx.progress(...)` reaches the database in batches.

Messages it accepts (in its mailbox, put there by `ProgressWriter.report`):
- `ProgressUpdate`: one job's latest percentage and note.
- the stop token of `Batcher.stopper`: write what was reported before it, then end.

Progress is advisory: a full (or closing) mailbox drops an update, never the job; and
of several updates to one job in a batch only the newest is written.
"""

from __future__ import annotations

import trio

from actors.ports import ProgressUpdate, Store
from actors.runtime.clock import Clock
from actors.runtime.mailbox import Mailbox, MailboxClosed
from actors.services.batcher import Backlog, Batcher


class Progress:
    """The mailbox and backlog the progress writer's incarnations share."""

    def __init__(self, capacity: int = 20_000) -> None:
        self.mailbox: Mailbox[ProgressUpdate] = Mailbox("progress", capacity=capacity)
        self.backlog: Backlog[ProgressUpdate] = Backlog()

    def report(self, job_id: int, token: int, pct: float | None, note: str | None) -> None:
        try:
            self.mailbox.tell_nowait(ProgressUpdate(job_id, token, pct, note))
        except (trio.WouldBlock, MailboxClosed):
            pass  # progress is advisory; a full (or closing) mailbox drops it, never the job


class ProgressWriter(Batcher[ProgressUpdate]):
    """Collects updates for up to 0.25 s (or 2000 of them), then writes the newest per job."""

    def __init__(self, progress: Progress, store: Store, *, lease_s: float, clock: Clock):
        super().__init__(progress.mailbox, self._write_progress, clock=clock, max_items=2000,
                         max_wait_s=0.25, backlog=progress.backlog)
        self._store = store
        self._lease_s = lease_s

    async def _write_progress(self, batch: list[ProgressUpdate]) -> None:
        latest = {u.id: u for u in batch}  # the newest update per job wins
        await self._store.write_progress(list(latest.values()), self._lease_s)
