"""Mailbox semantics: ordering, backpressure, ask/reply, and the Actor loop."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from actors.runtime.mailbox import (
    Actor,
    AskTimeout,
    Envelope,
    Mailbox,
    MailboxClosed,
    NoReply,
    reply,
)


class Boom(Exception):
    pass


class Calc(Actor[Any]):
    """Doubles ints, raises Boom for "boom", sleeps on ("sleep", s)."""

    async def handle(self, msg: Any) -> Any:
        if msg == "boom":
            raise Boom("handler failed")
        if isinstance(msg, tuple):
            await trio.sleep(msg[1])
            return "slept"
        return msg * 2


async def test_tell_delivers_in_order():
    box: Mailbox[int] = Mailbox("m", capacity=10)
    for i in range(5):
        await box.tell(i)
    box.tell_nowait(5)
    assert box.qsize() == 6
    got = [(await box.receive()).msg for _ in range(5)]
    assert got == [0, 1, 2, 3, 4]
    assert box.receive_nowait().msg == 5
    with pytest.raises(trio.WouldBlock):
        box.receive_nowait()


async def test_full_mailbox_applies_backpressure():
    box: Mailbox[int] = Mailbox("m", capacity=2)
    await box.tell(1)
    await box.tell(2)
    with pytest.raises(trio.WouldBlock):
        box.tell_nowait(3)

    told = trio.Event()

    async def sender():
        await box.tell(3)
        told.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        assert not told.is_set()
        assert box.statistics().blocked_senders == 1
        assert (await box.receive()).msg == 1  # draining one slot lets the sender in
        await told.wait()
    assert box.qsize() == 2
    assert box.statistics().blocked_senders == 0


async def test_ask_returns_the_handlers_value():
    actor = Calc("calc")
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        assert await actor.mailbox.ask(21) == 42
        nursery.cancel_scope.cancel()


async def test_ask_reraises_the_handlers_exception_and_the_actor_crashes():
    actor = Calc("calc")
    caught: list[BaseException] = []

    async def run_actor():
        try:
            await actor.run()
        except Boom as exc:
            caught.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_actor)
        with pytest.raises(Boom, match="handler failed"):
            await actor.mailbox.ask("boom")
    assert len(caught) == 1  # let it crash: the actor died as well


async def test_ask_times_out(autojump_clock):
    box: Mailbox[int] = Mailbox("nobody-home")
    start = trio.current_time()
    with pytest.raises(AskTimeout, match="nobody-home"):
        await box.ask(1, timeout=2.5)
    assert trio.current_time() - start == pytest.approx(2.5)


async def test_late_reply_after_timeout_is_dropped(autojump_clock):
    actor = Calc("calc")
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        with pytest.raises(AskTimeout):
            await actor.mailbox.ask(("sleep", 10), timeout=1)
        # The actor answers into a closed channel without crashing and keeps serving.
        assert await actor.mailbox.ask(2, timeout=20) == 4
        nursery.cancel_scope.cancel()


async def test_ask_gets_no_reply_when_the_actor_is_cancelled_midway(autojump_clock):
    actor = Calc("calc")
    actor_scope = trio.CancelScope()

    async def run_actor(task_status=trio.TASK_STATUS_IGNORED):
        with actor_scope:
            await actor.run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(run_actor)

        async def cancel_soon():
            await trio.sleep(1)
            actor_scope.cancel()

        nursery.start_soon(cancel_soon)
        with pytest.raises(NoReply):
            await actor.mailbox.ask(("sleep", 10), timeout=60)
        assert trio.current_time() < 60  # failed fast, not by timeout


async def test_reply_is_one_shot_and_ignores_tells():
    send, receive = trio.open_memory_channel[Any](1)
    envelope = Envelope("q", send)
    reply(envelope, 1)
    reply(envelope, 2)  # dropped
    assert await receive.receive() == (True, 1)
    with pytest.raises(trio.EndOfChannel):
        await receive.receive()
    reply(Envelope("tell"), 3)  # no channel, nothing to do


async def test_closed_mailbox_drains_then_ends_the_actor():
    actor = Calc("calc", Mailbox("calc", capacity=4))
    await actor.mailbox.tell(1)
    actor.mailbox.close()
    with pytest.raises(MailboxClosed):
        await actor.mailbox.tell(2)
    with pytest.raises(MailboxClosed):
        actor.mailbox.tell_nowait(2)
    await actor.run()  # handles the queued message, then returns normally
    assert actor.mailbox.qsize() == 0
    with pytest.raises(MailboxClosed):
        await actor.mailbox.receive()
    with pytest.raises(MailboxClosed):
        actor.mailbox.receive_nowait()


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        Mailbox("m", capacity=0)
