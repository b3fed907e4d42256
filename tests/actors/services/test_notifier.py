"""The notifier: each channel reaches whom it concerns, a malformed payload is dropped
and counted (never raised), pause refreshes coalesce, and a listener that overflowed is
followed by a full re-check as after a reconnect."""

from __future__ import annotations

import trio
import trio.testing

from actors.runtime.mailbox import Mailbox
from actors.services.notifier import Notifier, valid_payload
from actors.services.scheduler import Tick


class Targets:
    def __init__(self) -> None:
        self.woken: list[str | None] = []
        self.cancelled: list[int] = []
        self.dropped: list[str] = []
        self.refreshes = 0
        self.refreshing = trio.Event()
        self.release = trio.Event()
        self.scheduler: Mailbox = Mailbox("scheduler", capacity=1)

    async def refresh(self) -> None:
        self.refreshes += 1
        self.refreshing.set()
        await self.release.wait()

    def notifier(self, receive) -> Notifier:
        return Notifier(receive, wake=self.woken.append, cancel=self.cancelled.append,
                        refresh_pauses=self.refresh, scheduler=self.scheduler,
                        count_drop=self.dropped.append)


async def run_with(targets: Targets, items: list[tuple[str, str]], *, capacity: int = 100):
    send, receive = trio.open_memory_channel[tuple[str, str]](capacity)
    notifier = targets.notifier(receive)
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run)
        for item in items:
            await send.send(item)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return notifier


async def test_each_channel_is_routed():
    targets = Targets()
    targets.release.set()
    await run_with(targets, [("jobd_enqueued", "crawl"), ("jobd_cancel", "42"),
                             ("jobd_schedules", "nightly")])
    assert targets.woken == ["crawl"]
    assert targets.cancelled == [42]
    assert isinstance(targets.scheduler.receive_nowait().msg, Tick)
    assert targets.refreshes == 0


async def test_a_reconnect_wakes_every_queue_and_rereads_the_pauses():
    targets = Targets()
    targets.release.set()
    await run_with(targets, [("jobd_enqueued", ""), ("jobd_cancel", "")])
    assert targets.woken == [None] and targets.cancelled == []
    assert targets.refreshes == 1


async def test_malformed_payloads_are_dropped_and_counted_and_the_next_one_routed():
    targets = Targets()
    await run_with(targets, [("jobd_cancel", "-5"), ("jobd_enqueued", "a\nb"),
                             ("jobd_other", "x"), ("jobd_cancel", "7")])
    assert targets.dropped == ["jobd_cancel", "jobd_enqueued", "jobd_other"]
    assert targets.cancelled == [7]


async def test_a_raising_target_costs_that_notification_only():
    targets = Targets()

    def boom(queue):
        raise RuntimeError("boom")

    send, receive = trio.open_memory_channel[tuple[str, str]](10)
    notifier = Notifier(receive, wake=boom, cancel=targets.cancelled.append,
                        refresh_pauses=targets.refresh, scheduler=targets.scheduler,
                        count_drop=targets.dropped.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run)
        await send.send(("jobd_enqueued", "q"))
        await send.send(("jobd_cancel", "3"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert targets.dropped == ["jobd_enqueued"] and targets.cancelled == [3]


async def test_pause_refreshes_coalesce_while_one_runs():
    targets = Targets()
    send, receive = trio.open_memory_channel[tuple[str, str]](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(targets.notifier(receive).run)
        await send.send(("jobd_paused", "q"))
        await targets.refreshing.wait()
        for _ in range(50):  # all during the first refresh: one more refresh, not 50
            await send.send(("jobd_paused", "q"))
        await trio.testing.wait_all_tasks_blocked()
        targets.release.set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert targets.refreshes == 2


async def test_after_the_listener_overflowed_everything_is_looked_at_again():
    targets = Targets()
    targets.release.set()
    send, receive = trio.open_memory_channel[tuple[str, str]](1)
    notifier = targets.notifier(receive)
    send.send_nowait(("jobd_enqueued", "a"))
    notifier.listener_full("jobd_enqueued", "b")  # what the store's callback does when full
    assert targets.dropped == ["jobd_enqueued"]
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert targets.woken == [None, "a"] and targets.refreshes == 1


def test_payload_rules():
    assert valid_payload("jobd_cancel", "9223372036854775807")
    for bad in ("9223372036854775808", "0", "-1", "1.0", "٣", " 1"):
        assert not valid_payload("jobd_cancel", bad), bad
    assert valid_payload("jobd_cancel", "")
    assert valid_payload("jobd_enqueued", "crawl")
    assert not valid_payload("jobd_paused", "a\nb")
    assert not valid_payload("jobd_enqueued", "q" * 256)
    assert not valid_payload("jobd_other", "x")
