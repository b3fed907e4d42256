"""Bounded mailboxes, tell/ask, and the `Actor` base class.

A `Mailbox` is owned by whoever builds the actor tree, not by the actor task: a
supervisor restarts an actor by running a fresh `Actor` object on the *same* mailbox,
so messages queued (or told) during a restart are handled by the next incarnation and
callers holding the mailbox never notice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

M = TypeVar("M")


class AskTimeout(Exception):
    """No reply within the ask's timeout (which covers queueing and handling)."""


class MailboxClosed(Exception):
    """The mailbox was closed: no more messages will be accepted or delivered."""


class NoReply(Exception):
    """The actor stopped (was cancelled) while handling the request, without answering."""


class Envelope(Generic[M]):
    """A message plus, for an ask, the one-shot channel its answer goes back on."""

    __slots__ = ("msg", "reply")

    def __init__(self, msg: M, reply: trio.MemorySendChannel[Any] | None = None) -> None:
        self.msg = msg
        self.reply = reply

    def __repr__(self) -> str:
        return f"Envelope({self.msg!r}, ask={self.reply is not None})"


def reply(envelope: Envelope[Any], value: Any) -> None:
    """Answer an ask. Never blocks; a no-op for tells and for askers that gave up."""
    _answer(envelope, (True, value))


def reply_error(envelope: Envelope[Any], exc: BaseException) -> None:
    """Make the asker's `ask()` raise `exc`."""
    _answer(envelope, (False, exc))


def _answer(envelope: Envelope[Any], outcome: tuple[bool, Any]) -> None:
    if envelope.reply is None:
        return
    try:
        envelope.reply.send_nowait(outcome)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the asker timed out and left, or this envelope was already answered
    envelope.reply.close()  # one-shot: a second answer is dropped, not queued


@dataclass(frozen=True, slots=True)
class MailboxStats:
    name: str
    queued: int
    capacity: int
    blocked_senders: int  # > 0 means backpressure is being applied right now
    waiting_receivers: int


class Mailbox(Generic[M]):
    def __init__(self, name: str, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError("a mailbox needs a capacity of at least 1")
        self.name = name
        self.capacity = capacity
        self._send, self._receive = trio.open_memory_channel[Envelope[M]](capacity)

    def __repr__(self) -> str:
        return f"Mailbox({self.name!r}, {self.qsize()}/{self.capacity})"

    async def tell(self, msg: M) -> None:
        """Enqueue `msg`, waiting while the mailbox is full (that wait is backpressure)."""
        await self._put(Envelope(msg))

    def tell_nowait(self, msg: M) -> None:
        """Enqueue `msg` or raise `trio.WouldBlock` if the mailbox is full."""
        try:
            self._send.send_nowait(Envelope(msg))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise MailboxClosed(self.name) from None

    async def ask(self, msg: M, timeout: float = 5.0) -> Any:
        """Send `msg` and return the handler's result, or raise the handler's exception.

        The timeout covers waiting for room in the mailbox as well as the handling, so
        an ask never waits longer than `timeout` in total.
        """
        send, receive = trio.open_memory_channel[tuple[bool, Any]](1)
        with receive:
            try:
                with trio.fail_after(timeout):
                    await self._put(Envelope(msg, send))
                    ok, value = await receive.receive()
            except trio.TooSlowError:
                raise AskTimeout(f"{self.name} did not answer within {timeout}s") from None
            except trio.EndOfChannel:
                raise NoReply(f"{self.name} stopped before answering {msg!r}") from None
        if not ok:
            raise value
        return value

    async def receive(self) -> Envelope[M]:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise MailboxClosed(self.name) from None

    def receive_nowait(self) -> Envelope[M]:
        """The next envelope, or `trio.WouldBlock` if none is queued (for batching)."""
        try:
            return self._receive.receive_nowait()
        except trio.EndOfChannel:
            raise MailboxClosed(self.name) from None

    def __aiter__(self) -> Mailbox[M]:
        return self

    async def __anext__(self) -> Envelope[M]:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Refuse new messages; receivers drain what is queued, then iteration ends."""
        self._send.close()

    def qsize(self) -> int:
        return self._send.statistics().current_buffer_used

    def statistics(self) -> MailboxStats:
        s = self._send.statistics()
        return MailboxStats(
            name=self.name,
            queued=s.current_buffer_used,
            capacity=self.capacity,
            blocked_senders=s.tasks_waiting_send,
            waiting_receivers=s.tasks_waiting_receive,
        )

    async def _put(self, envelope: Envelope[M]) -> None:
        try:
            await self._send.send(envelope)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise MailboxClosed(self.name) from None


class Actor(Generic[M]):
    """A task that handles the messages of one mailbox, one at a time.

    Construct it with the mailbox it serves; when a supervisor restarts the actor it
    builds a new object on the same mailbox (see `ChildSpec.for_actor`).

    Failure semantics (let it crash): if `handle` raises, the actor crashes and its
    supervisor logs and restarts it. For an ask the exception is first sent to the
    asker, so the caller sees the real error instead of a timeout. If the actor is
    cancelled mid-ask, the asker gets `NoReply` at once.
    """

    def __init__(self, name: str, mailbox: Mailbox[M] | None = None) -> None:
        self.name = name
        self.mailbox: Mailbox[M] = mailbox if mailbox is not None else Mailbox(name)

    async def setup(self) -> None:
        """Runs before the actor reports itself started; a failure here is a crash."""

    async def handle(self, msg: M) -> Any:
        raise NotImplementedError

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Handle messages until the mailbox is closed and drained."""
        await self.setup()
        task_status.started()
        async for envelope in self.mailbox:
            await self.dispatch(envelope)

    async def dispatch(self, envelope: Envelope[M]) -> None:
        if envelope.reply is None:
            await self.handle(envelope.msg)
            return
        # Closing on every exit path is what lets the asker tell "dropped" from "slow".
        with envelope.reply:
            try:
                value = await self.handle(envelope.msg)
            except Exception as exc:
                reply_error(envelope, exc)
                raise
            reply(envelope, value)
