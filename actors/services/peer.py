"""Peer: which daemon leads, among all the daemons sharing one database (Oban's Peer).

Accepts:
- `Check`: ask for the lock, or check the held one, now rather than at the next
  interval (tests; the interval timer does the same). Asked, it answers whether this
  daemon leads.

Work that must happen on one daemon per database (the database-derived gauges today;
anything later) reads `Leadership.leading`, waits for a change with
`Leadership.wait()`, and runs its leader-only queries on the leader's own connection
with `Leadership.session()`.

The lease is a session-level advisory lock on a connection of its own: every interval
the Peer asks for it until it wins, then checks with a round trip that the connection
(and with it the lock) is still there. Postgres drops the lock when the connection
ends, however it ends, so a daemon killed or cut off stops leading on the server at
once and another takes over within one interval; here, `leading` turns False as soon
as the Peer sees the connection gone (its next check, or a leader-only query that
failed). A transaction-level lock would not do: it is released at each commit, and
every daemon would end up leading in turn.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Generic, TypeVar

import msgspec
import trio

from actors.ports import LeaderSession, StoreUnavailable
from actors.runtime.clock import Clock
from actors.runtime.mailbox import Actor, Envelope, Mailbox, MailboxClosed, reply

log = logging.getLogger("jobd.peer")

S = TypeVar("S", bound=LeaderSession)

MAX_BACKOFF_S = 10.0  # after an outage, leadership is settled again this soon


class Check(msgspec.Struct, tag="check"):
    """Ask for the lock (or check the held one) now; answers whether this daemon leads."""


class NotLeading(Exception):
    """A leader-only query was asked of a daemon that does not lead (or just stopped)."""


class Leadership(Generic[S]):
    """Whether this daemon leads, and the leader's session; written only by the Peer.

    Outlives Peer restarts: readers hold this object, not the actor.
    """

    def __init__(self) -> None:
        self.leading = False
        self._session: S | None = None
        self._changed = trio.Event()
        # One user of the session at a time: asyncpg runs one statement per connection.
        self._lock = trio.Lock()
        self._on_lost: Callable[[], None] = lambda: None

    async def wait(self, leading: bool = True) -> None:
        """Return once `self.leading == leading` (at once if it already is)."""
        while self.leading != leading:
            await self._changed.wait()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[S]:
        """The leader's session, for one leader-only query at a time.

        Raises NotLeading if this daemon does not lead when its turn comes. A
        StoreUnavailable from the query means the connection is gone, and the lock with
        it: the Peer is told at once, and `leading` turns False.
        """
        async with self._lock:
            session = self._session
            if session is None:
                raise NotLeading("this daemon does not lead")
            try:
                yield session
            except StoreUnavailable:
                self._set(None)
                self._on_lost()
                raise

    def _set(self, session: S | None) -> None:
        self._session = session
        leading = session is not None
        if leading != self.leading:
            self.leading = leading
            self._changed.set()
            self._changed = trio.Event()


class Peer(Actor[Check], Generic[S]):
    """Holds the leader lock when it can; keeps `leadership` saying whether it does."""

    def __init__(
        self,
        mailbox: Mailbox[Check],
        open_session: Callable[[], AbstractAsyncContextManager[S]],
        leadership: Leadership[S],
        *,
        interval_s: float,
        clock: Clock,
    ):
        super().__init__(mailbox.name, mailbox)
        self._open = open_session
        self.leadership = leadership
        self._interval_s = interval_s
        self._clock = clock
        self._won = False  # this session took the lock (so losing it is worth a warning)
        leadership._on_lost = self._check_soon

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        backoff = self._interval_s
        while True:
            self._won = False
            try:
                async with self._open() as session:
                    backoff = self._interval_s
                    await self._lead(session)
                    return  # the mailbox closed: the daemon is stopping
            except StoreUnavailable as exc:
                if self._won:
                    log.warning("this daemon lost the leadership: %s", exc,
                                extra={"event": "peer.lost"})
            except Exception:  # noqa: BLE001 - a lost lease must not restart the tree
                log.exception("the leader lease failed", extra={"event": "peer.failed"})
            finally:
                # Whatever ended the session ended the lock with it (or we are stopping).
                self.leadership._set(None)
            await self._clock.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _lead(self, session: S) -> None:
        """Check every interval, or on a `Check`, until the session fails or the mailbox
        closes. A failed leader-only query has already cleared `leadership`; the next
        check (sent by it) then fails on the dead connection and ends the session."""
        leadership = self.leadership
        asked: list[Envelope[Check]] = []
        while True:
            try:
                async with leadership._lock:
                    if leadership._session is session:
                        await session.ping()
                    elif await session.try_lead():
                        leadership._set(session)
                        self._won = True
                        log.info("this daemon now leads", extra={"event": "peer.leading"})
            finally:
                for envelope in asked:
                    reply(envelope, leadership.leading)
                asked.clear()
            with trio.move_on_after(self._interval_s):
                try:
                    envelope = await self.mailbox.receive()
                except MailboxClosed:
                    return
                if envelope.reply is not None:
                    asked.append(envelope)

    def _check_soon(self) -> None:
        try:
            self.mailbox.tell_nowait(Check())
        except (trio.WouldBlock, MailboxClosed):
            pass  # a check is already queued, or we are stopping

