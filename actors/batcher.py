"""Collect items until N of them or T seconds, then write them in one call.

The completer (finished attempts) and the progress writer use it: a round trip per
job would cap throughput at the bridge's round-trip rate.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

from actors.clock import Clock
from actors.mailbox import Actor, Envelope, Mailbox, MailboxClosed
from actors.ports import StoreUnavailable

log = logging.getLogger("jobd.batcher")

T = TypeVar("T")


class Batcher(Actor[T], Generic[T]):
    def __init__(
        self,
        mailbox: Mailbox[T],
        flush: Callable[[list[T]], Awaitable[None]],
        *,
        clock: Clock,
        max_items: int = 1000,
        max_wait_s: float = 0.0,
    ):
        super().__init__(mailbox.name, mailbox)
        self._flush = flush
        self._clock = clock
        self._max_items = max_items
        self._max_wait_s = max_wait_s
        self.flushes = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                first = await self.mailbox.receive()
            except MailboxClosed:
                return  # closed by `drain_and_stop` and fully written
            batch = [first.msg]
            deadline = self._clock.now() + self._max_wait_s
            # Under load the mailbox refills while the previous flush is in flight, so
            # batches grow by themselves; with max_wait_s = 0 an idle write goes at once.
            while len(batch) < self._max_items:
                envelope = self._take_nowait()
                if envelope is None:
                    if self._clock.now() >= deadline:
                        break
                    with trio.move_on_at(deadline):
                        envelope = await self.mailbox.receive()
                    if envelope is None:
                        break
                batch.append(envelope.msg)
            await self._write(batch)

    @staticmethod
    def stopper(mailbox: Mailbox[T]) -> Callable[[], Awaitable[None]]:
        """A ChildSpec `stop` hook: refuse new items, write what is queued, then return."""

        async def stop() -> None:
            mailbox.close()

        return stop

    def _take_nowait(self) -> Envelope[T] | None:
        try:
            return self.mailbox.receive_nowait()
        except trio.WouldBlock:
            return None

    async def _write(self, batch: list[T]) -> None:
        backoff = 0.05
        while True:
            try:
                # Shielded: an item taken from the mailbox must reach the database or
                # stay in our hands; cancelling mid-write would drop it.
                with trio.CancelScope(shield=True):
                    await self._flush(batch)
                self.flushes += 1
                return
            except StoreUnavailable as exc:
                log.warning("%s: write failed, retrying in %.2fs: %s", self.name, backoff, exc,
                            extra={"event": "batch.retry", "actor": self.name})
                await self._clock.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
