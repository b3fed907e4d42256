"""The heart: one beat renews every lease it is given, stops the attempts whose leases
are gone, hands on the cancel requests the store holds, and an outage costs a beat,
not the heart."""

from __future__ import annotations

import trio
import trio.testing

from actors.ports import StoreUnavailable
from actors.runtime.clock import TrioClock
from actors.runtime.mailbox import Mailbox
from actors.services.heart import Beat, Heart


class FakeStore:
    def __init__(self) -> None:
        self.beats: list[tuple[str, float, str, bool, list[tuple[int, int]]]] = []
        self.lost: list[tuple[int, int]] = []
        self.cancels: list[int] = []
        self.down = False

    async def heartbeat(self, daemon_id, lease_s, status, draining, *, running):
        await trio.lowlevel.checkpoint()
        if self.down:
            raise StoreUnavailable("down")
        self.beats.append((daemon_id, lease_s, status, draining, list(running)))
        return self.lost

    async def running_cancel_requests(self, daemon_id):
        return self.cancels


def heart(store, box, *, cancelled, lost, running=lambda: [(1, 10), (2, 20)]):
    return Heart(box, store, daemon_id="d1", lease_s=30.0, interval_s=10.0,
                 status=lambda: ("ready; 2 jobs running", False), running=running,
                 cancel=cancelled.append, lease_lost=lambda i, t: lost.append((i, t)),
                 clock=TrioClock())


async def test_a_beat_renews_stops_the_lost_and_passes_on_cancels():
    store, cancelled, lost = FakeStore(), [], []
    store.lost = [(2, 20)]
    store.cancels = [1]
    h = heart(store, Mailbox("heart", capacity=4), cancelled=cancelled, lost=lost)
    await h.beat()
    assert store.beats == [("d1", 30.0, "ready; 2 jobs running", False, [(1, 10), (2, 20)])]
    assert (lost, cancelled, h.beats) == ([(2, 20)], [1], 1)


async def test_an_outage_costs_a_beat_and_a_beat_message_beats_at_once(autojump_clock):
    store, cancelled, lost = FakeStore(), [], []
    store.down = True
    box: Mailbox[Beat] = Mailbox("heart", capacity=4)
    h = heart(store, box, cancelled=cancelled, lost=lost)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.run)
        await trio.testing.wait_all_tasks_blocked()
        assert store.beats == [] and h.beats == 0  # failed, and the heart still runs
        store.down = False
        await box.tell(Beat())
        await trio.testing.wait_all_tasks_blocked()
        assert h.beats == 1
        nursery.cancel_scope.cancel()
