"""The Peer: one leader per database, takeover when the leader's connection goes.

First on an in-memory lock table with trio's MockClock (the intervals and the backoff
are virtual), then against the real Postgres: two Peers on one database, and the
leader's backend killed with pg_terminate_backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from actors.ports import StoreUnavailable
from actors.runtime.clock import TrioClock
from actors.runtime.mailbox import Mailbox
from actors.services.peer import MAX_BACKOFF_S, Check, Leadership, NotLeading, Peer

INTERVAL = 15.0


class FakeDatabase:
    """One advisory lock; sessions hold it until they end, like Postgres's session locks."""

    def __init__(self) -> None:
        self.holder: FakeSession | None = None
        self.down = False
        self.opened = 0
        self.opened_at: list[float] = []

    @asynccontextmanager
    async def session(self) -> AsyncIterator[FakeSession]:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise StoreUnavailable("database unavailable: refused")
        self.opened += 1
        self.opened_at.append(trio.current_time())
        session = FakeSession(self)
        try:
            yield session
        finally:
            session.kill()


class FakeSession:
    def __init__(self, db: FakeDatabase) -> None:
        self.db = db
        self.alive = True

    def kill(self) -> None:
        self.alive = False
        if self.db.holder is self:
            self.db.holder = None

    def _round_trip(self) -> None:
        if not self.alive or self.db.down:
            self.kill()
            raise StoreUnavailable("database connection lost")

    async def try_lead(self) -> bool:
        await trio.lowlevel.checkpoint()
        self._round_trip()
        if self.db.holder is None:
            self.db.holder = self
        return self.db.holder is self

    async def ping(self) -> None:
        await trio.lowlevel.checkpoint()
        self._round_trip()


def make_peer(open_session, name: str = "peer", interval_s: float = INTERVAL):
    leadership: Leadership = Leadership()
    peer = Peer(Mailbox(name), open_session, leadership, interval_s=interval_s,
                clock=TrioClock())
    return peer, leadership


async def test_two_peers_exactly_one_leads(nursery, autojump_clock):
    db = FakeDatabase()
    a, lead_a = make_peer(db.session, "a")
    b, lead_b = make_peer(db.session, "b")
    await nursery.start(a.run)
    await lead_a.wait(True)
    await nursery.start(b.run)
    for _ in range(3):  # each ask answers after one more check of its own
        assert await b.mailbox.ask(Check()) is False
        assert await a.mailbox.ask(Check()) is True
    assert lead_a.leading and not lead_b.leading


async def test_the_other_takes_over_within_one_interval(nursery, autojump_clock):
    db = FakeDatabase()
    a, lead_a = make_peer(db.session, "a")
    b, lead_b = make_peer(db.session, "b")
    await nursery.start(a.run)
    await lead_a.wait(True)
    await nursery.start(b.run)
    assert await b.mailbox.ask(Check()) is False
    killed_at = trio.current_time()
    assert db.holder is not None
    db.holder.kill()  # the server ended the leader's connection
    with trio.fail_after(INTERVAL + 1):
        await lead_b.wait(True)
        await lead_a.wait(False)
    assert trio.current_time() - killed_at <= INTERVAL
    # a backs off one interval, reconnects, and follows now.
    assert await a.mailbox.ask(Check(), timeout=3 * INTERVAL) is False


async def test_a_failed_leader_query_stops_leading_at_once(nursery, autojump_clock):
    db = FakeDatabase()
    a, lead_a = make_peer(db.session)
    await nursery.start(a.run)
    await lead_a.wait(True)
    started = trio.current_time()
    db.holder.kill()
    with pytest.raises(StoreUnavailable):
        async with lead_a.session() as session:
            await session.ping()
    assert not lead_a.leading  # before any interval passed
    assert trio.current_time() == started
    with pytest.raises(NotLeading):
        async with lead_a.session():
            pass
    with trio.fail_after(INTERVAL * 2):
        await lead_a.wait(True)  # the Peer heard, reconnected, and leads again
    assert db.opened == 2


async def test_backoff_doubles_while_the_database_is_down(nursery, autojump_clock):
    db = FakeDatabase()
    a, lead_a = make_peer(db.session, interval_s=1.0)
    await nursery.start(a.run)
    await lead_a.wait(True)
    db.down = True
    await lead_a.wait(False)
    lost_at = trio.current_time()
    await trio.sleep(60)
    assert not lead_a.leading
    db.down = False
    await lead_a.wait(True)
    # While down: sessions refused after 1, 2, 4, 8 s, then every MAX_BACKOFF_S.
    assert db.opened == 2
    waited = trio.current_time() - lost_at
    assert 60 < waited <= 60 + MAX_BACKOFF_S


async def test_stopping_the_peer_ends_the_leadership(autojump_clock):
    db = FakeDatabase()
    a, lead_a = make_peer(db.session)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await lead_a.wait(True)
        nursery.cancel_scope.cancel()
    assert not lead_a.leading
    assert db.holder is None


# --------------------------------------------------------------------------- against Postgres

# The lock key's two halves, as pg_locks shows a bigint advisory lock.
LOCK_KEY = 0x6A6F6264_6D657472
LEADER_PID = """
SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND granted AND classid = $1 AND objid = $2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


async def leader_pid(store) -> int | None:
    async with store.transaction() as tx:
        return await tx.fetchval(LEADER_PID, LOCK_KEY >> 32, LOCK_KEY & 0xFFFFFFFF)


async def test_postgres_one_leader_and_takeover_after_pg_terminate_backend(store, nursery):
    a, lead_a = make_peer(store.metrics_session, "a", interval_s=0.05)
    b, lead_b = make_peer(store.metrics_session, "b", interval_s=0.05)
    await nursery.start(a.run)
    with trio.fail_after(10):
        await lead_a.wait(True)
    await nursery.start(b.run)
    assert await b.mailbox.ask(Check()) is False
    assert await b.mailbox.ask(Check()) is False
    assert lead_a.leading
    first = await leader_pid(store)
    assert first is not None

    async with store.transaction() as tx:
        assert await tx.fetchval("SELECT pg_terminate_backend($1)", first) is True
    with trio.fail_after(10):
        await lead_b.wait(True)
        await lead_a.wait(False)
    second = await leader_pid(store)
    assert second is not None and second != first
    assert await a.mailbox.ask(Check()) is False  # back, as a follower
