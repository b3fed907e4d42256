"""Batcher: what it took is written, across a closing mailbox, restarts and refused values.

The flush here is a plain function (the batcher's injection point); the completer's
real write path is covered in tests/e2e/test_db_outage.py and test_store_jobs.py.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from actors.ports import StoreUnavailable, ValueRejected
from actors.runtime.clock import TrioClock
from actors.runtime.mailbox import Mailbox
from actors.runtime.specs import ChildSpec, Strategy
from actors.runtime.supervisor import Supervisor
from actors.services.batcher import Backlog, Batcher


@pytest.fixture
def clock() -> TrioClock:
    return TrioClock()


class Sink:
    """A flush that records batches; `down` makes it fail like an unreachable store."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.down = False
        self.hang = False
        self.bad: set[int] = set()

    async def flush(self, batch: list[int]) -> None:
        await trio.lowlevel.checkpoint()
        if self.hang:
            await trio.sleep_forever()
        if self.down:
            raise StoreUnavailable("down")
        if self.bad & set(batch):
            raise ValueRejected(f"bad value in {batch}")
        self.batches.append(list(batch))

    @property
    def written(self) -> list[int]:
        return sorted(i for b in self.batches for i in b)


async def test_items_taken_when_the_mailbox_closes_are_written(clock, autojump_clock):
    # max_wait_s: the batcher is collecting (receive, then receive_nowait) when the
    # mailbox closes; MailboxClosed used to escape there and drop the batch in hand.
    sink = Sink()
    box: Mailbox[int] = Mailbox("completer", capacity=100)
    batcher = Batcher(box, sink.flush, clock=clock, max_items=100, max_wait_s=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        for i in range(5):
            await box.tell(i)
        await trio.testing.wait_all_tasks_blocked()
        box.close()
    assert sink.written == [0, 1, 2, 3, 4]


async def test_items_queued_before_close_are_written_too(clock):
    sink = Sink()
    box: Mailbox[int] = Mailbox("completer", capacity=100)
    for i in range(7):
        await box.tell(i)
    box.close()
    await Batcher(box, sink.flush, clock=clock, max_items=3).run()
    assert sink.written == list(range(7))


async def test_the_stopper_writes_what_was_handed_over_and_leaves_the_mailbox_open(clock):
    sink = Sink()
    box: Mailbox[int] = Mailbox("completer", capacity=100)
    stop = Batcher.stopper(box)
    async with trio.open_nursery() as nursery:
        await nursery.start(Batcher(box, sink.flush, clock=clock).run)
        for i in range(3):
            await box.tell(i)
        await stop()
    assert sink.written == [0, 1, 2]
    await box.tell(3)  # still open: a restarted batcher takes it
    async with trio.open_nursery() as nursery:
        await nursery.start(Batcher(box, sink.flush, clock=clock).run)
        await stop()
    assert sink.written == [0, 1, 2, 3]


async def test_a_sibling_crash_restarts_both_batchers_and_they_keep_writing(clock, autojump_clock):
    """rest_for_one: a crash before the batchers restarts them through their stoppers.
    The stopper used to close the shared mailbox, so each restarted batcher exited at
    once, again and again, until the supervisor gave up."""
    completed, progress = Sink(), Sink()
    completer_box: Mailbox[int] = Mailbox("completer", capacity=100)
    progress_box: Mailbox[int] = Mailbox("progress", capacity=100)
    crashes = trio.Semaphore(0)

    async def crasher(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await crashes.acquire()
        raise RuntimeError("boom")

    children = [
        ChildSpec("crasher", crasher),
        ChildSpec.for_actor(lambda: Batcher(completer_box, completed.flush, clock=clock),
                            stop=Batcher.stopper(completer_box)),
        ChildSpec.for_actor(lambda: Batcher(progress_box, progress.flush, clock=clock,
                                             max_wait_s=0.25),
                            stop=Batcher.stopper(progress_box)),
    ]
    root = Supervisor("root", children, Strategy.REST_FOR_ONE, max_restarts=5, max_seconds=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(root.run)
        for round_ in range(4):
            await completer_box.tell(round_)
            await progress_box.tell(round_)
            crashes.release()
            await trio.sleep(1)
            assert root.state == "running"
        await completer_box.tell(99)
        await progress_box.tell(99)
        await trio.sleep(1)
        await root.stop()
    assert completed.written == [0, 1, 2, 3, 99]
    assert progress.written == [0, 1, 2, 3, 99]


async def test_a_batch_in_hand_survives_a_restart_during_an_outage(clock, autojump_clock):
    sink = Sink()
    sink.hang = True  # a hung database: the write never returns
    box: Mailbox[int] = Mailbox("completer", capacity=100)
    backlog: Backlog[int] = Backlog()
    spec = ChildSpec.for_actor(lambda: Batcher(box, sink.flush, clock=clock, backlog=backlog),
                               stop=Batcher.stopper(box), shutdown_timeout=2)
    sup = Supervisor("root", [spec], Strategy.ONE_FOR_ONE)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for i in range(3):
            await box.tell(i)
        await trio.sleep(1)
        await sup.stop()  # bounded by shutdown_timeout, though the write hangs
    assert sink.written == []
    # Not lost: what it took is in the backlog (the rest still queued), and the next
    # batcher writes it first.
    assert backlog.items and backlog.items == list(range(len(backlog)))
    sink.hang = False
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await box.tell(3)
        await trio.sleep(1)
        await sup.stop()
    assert sink.written == [0, 1, 2, 3]
    assert len(backlog) == 0


async def test_writes_are_retried_while_the_store_is_unavailable(clock, autojump_clock):
    sink = Sink()
    sink.down = True
    box: Mailbox[int] = Mailbox("completer", capacity=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(Batcher(box, sink.flush, clock=clock).run)
        await box.tell(1)
        await trio.sleep(30)
        sink.down = False
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert sink.written == [1]


async def test_a_refused_value_is_split_out_and_replaced(clock):
    sink = Sink()
    sink.bad = {13, 17}
    rejected: list[int] = []
    settled: list[int] = []

    def reject(item: int, exc: ValueRejected) -> int | None:
        rejected.append(item)
        return -item if item == 13 else None  # 13 is rewritten, 17 dropped

    box: Mailbox[int] = Mailbox("completer", capacity=100)
    for i in range(20):
        await box.tell(i)
    box.close()
    await Batcher(box, sink.flush, clock=clock, max_items=20, reject=reject,
                  settled=settled.extend).run()
    assert sorted(rejected) == [13, 17]
    assert sink.written == sorted([-13, *[i for i in range(20) if i not in (13, 17)]])
    assert sorted(settled) == list(range(20))  # every item accounted for, once


async def test_an_unencodable_value_is_treated_as_refused(clock):
    async def flush(batch: list[int]) -> None:
        if 3 in batch:
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        written.extend(batch)

    written: list[int] = []
    box: Mailbox[int] = Mailbox("completer", capacity=100)
    for i in range(6):
        await box.tell(i)
    box.close()
    await Batcher(box, flush, clock=clock, reject=lambda item, exc: 100 + item).run()
    assert sorted(written) == [0, 1, 2, 4, 5, 103]
