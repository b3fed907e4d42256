"""Collect items until N of them or T seconds, then write them in one call.

The completer (finished attempts) and the progress writer use it: a round trip per
job would cap throughput at the bridge's round-trip rate.

What a batcher has taken from its mailbox and not yet written is its `Backlog`, which
the tree's builder owns like the mailbox: a batcher restarted (its own crash, a
sibling's under rest_for_one) or cancelled mid-write leaves it to the next incarnation,
which writes it first. Writes are fenced in the database (lease tokens), so writing a
batch again after a write whose fate is unknown is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

from actors.ports import StoreUnavailable, ValueRejected
from actors.runtime.clock import Clock
from actors.runtime.mailbox import Actor, Envelope, Mailbox, MailboxClosed

log = logging.getLogger("jobd.batcher")

T = TypeVar("T")


class Backlog(Generic[T]):
    """Items taken from the mailbox and not yet written; outlives batcher restarts."""

    def __init__(self) -> None:
        self.items: list[T] = []

    def __len__(self) -> int:
        return len(self.items)


class _Stop:
    """Put in the mailbox by `Batcher.stopper`: write everything before me, then return.

    A batcher cancelled before it reaches the token (shutdown timeout) leaves it queued;
    `expired` tells the next incarnation to ignore it.
    """

    __slots__ = ("done", "expired")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.expired = False


class Batcher(Actor[T], Generic[T]):
    def __init__(
        self,
        mailbox: Mailbox[T],
        flush: Callable[[list[T]], Awaitable[None]],
        *,
        clock: Clock,
        max_items: int = 1000,
        max_wait_s: float = 0.0,
        backlog: Backlog[T] | None = None,
        reject: Callable[[T, ValueRejected], T | None] | None = None,
        settled: Callable[[list[T]], None] | None = None,
    ):
        """`reject(item, error)`: an item the database refused on its own (found by
        splitting the batch) is replaced by what it returns, or dropped on None.
        `settled(items)`: these items are written (or given up as unwritable)."""
        super().__init__(mailbox.name, mailbox)
        self._flush = flush
        self._clock = clock
        self._max_items = max_items
        self._max_wait_s = max_wait_s
        self.backlog: Backlog[T] = backlog if backlog is not None else Backlog()
        self._reject = reject
        self._settled = settled
        self.flushes = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        # What a previous incarnation took and could not write goes first.
        await self._write()
        while True:
            try:
                first = await self.mailbox.receive()
            except MailboxClosed:
                return  # closed and fully written
            stop = self._stop_token(first)
            if stop is not None:
                stop.done.set()
                return
            batch = self.backlog.items
            batch.append(first.msg)
            deadline = self._clock.now() + self._max_wait_s
            # Under load the mailbox refills while the previous flush is in flight, so
            # batches grow by themselves; with max_wait_s = 0 an idle write goes at once.
            ended = False
            while len(batch) < self._max_items:
                try:
                    envelope = self._take_nowait()
                    if envelope is None:
                        if self._clock.now() >= deadline:
                            break
                        with trio.move_on_at(deadline):
                            envelope = await self.mailbox.receive()
                        if envelope is None:
                            break
                except MailboxClosed:
                    ended = True  # closed: what we hold is the last of it
                    break
                stop = self._stop_token(envelope)
                if stop is not None:
                    await self._write()
                    stop.done.set()
                    return
                batch.append(envelope.msg)
            await self._write()
            if ended:
                return

    @staticmethod
    def stopper(mailbox: Mailbox[T]) -> Callable[[], Awaitable[None]]:
        """A ChildSpec `stop` hook: write what was handed over before it, then return.

        It does not close the mailbox: a batcher stopped for a restart (rest_for_one)
        comes back on the same mailbox, and producers keep handing over meanwhile.
        """

        async def stop() -> None:
            token = _Stop()
            try:
                await mailbox.tell(token)  # type: ignore[arg-type]  # behind what is queued
                await token.done.wait()
            except MailboxClosed:
                pass  # closed by someone else: the batcher ends when it is drained
            finally:
                token.expired = True

        return stop

    @staticmethod
    def _stop_token(envelope: Envelope[T]) -> _Stop | None:
        msg = envelope.msg
        if isinstance(msg, _Stop):
            return None if msg.expired else msg
        return None

    def _take_nowait(self) -> Envelope[T] | None:
        """The next envelope or None; MailboxClosed once the mailbox is closed and empty."""
        while True:
            try:
                envelope = self.mailbox.receive_nowait()
            except trio.WouldBlock:
                return None
            msg = envelope.msg
            if isinstance(msg, _Stop) and msg.expired:
                continue  # left by an incarnation cancelled before it got there
            return envelope

    async def _write(self) -> None:
        """Write the backlog, retrying while the store is unavailable.

        Not shielded: cancelled mid-write (a restart, the end of a shutdown timeout),
        the items stay in the backlog for whoever runs next.
        """
        if self.backlog.items:
            await self._write_part(self.backlog.items)
            self.backlog.items = []
            self.flushes += 1

    async def _write_part(self, batch: list[T]) -> None:
        backoff = 0.05
        while True:
            try:
                await self._flush(batch)
            except StoreUnavailable as exc:  # Conflict (a deadlock) too: the same call may be retried
                log.warning("%s: write failed, retrying in %.2fs: %s", self.name, backoff, exc,
                            extra={"event": "batch.retry", "actor": self.name})
                await self._clock.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except ValueRejected as exc:
                await self._split(batch, exc)
                return
            except Exception as exc:  # noqa: BLE001 - one bad item must not crash-loop the writer
                # E.g. a string asyncpg cannot encode (a lone surrogate): the same as a
                # value the server refused.
                await self._split(batch, ValueRejected(f"{exc.__class__.__name__}: {exc}"))
                return
            if self._settled is not None:
                self._settled(batch)
            return

    async def _split(self, batch: list[T], exc: ValueRejected) -> None:
        """The database refused the batch for a value in it: write the halves apart
        until the items it refuses are alone, then write their replacements."""
        if len(batch) > 1:
            middle = len(batch) // 2
            await self._write_part(batch[:middle])
            await self._write_part(batch[middle:])
            return
        [item] = batch
        replacement = self._reject(item, exc) if self._reject is not None else None
        log.error("%s: the database refused an item, %s: %s; %r", self.name,
                  "writing a replacement" if replacement is not None else "dropping it",
                  exc, item, extra={"event": "batch.rejected", "actor": self.name})
        if replacement is not None:
            try:
                await self._write_part_once_more(replacement)
            except ValueRejected as again:
                log.error("%s: the replacement was refused too, dropping it: %s; %r",
                          self.name, again, replacement,
                          extra={"event": "batch.rejected", "actor": self.name})
        if self._settled is not None:
            self._settled([item])

    async def _write_part_once_more(self, item: T) -> None:
        """Write one replacement; raises ValueRejected if it is refused too."""
        backoff = 0.05
        while True:
            try:
                await self._flush([item])
                return
            except StoreUnavailable as exc:
                log.warning("%s: write failed, retrying in %.2fs: %s", self.name, backoff, exc,
                            extra={"event": "batch.retry", "actor": self.name})
                await self._clock.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except ValueRejected:
                raise
            except Exception as exc:  # noqa: BLE001
                raise ValueRejected(f"{exc.__class__.__name__}: {exc}") from exc
