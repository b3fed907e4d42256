"""Keeps this daemon's row and every lease it holds alive, in one statement per beat.

Also the fallback path for cancellation: a running job marked `cancel_requested`
whose NOTIFY was lost is found here and stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec
import trio

from actors.ports import Store, StoreUnavailable
from actors.runtime.clock import Clock
from actors.runtime.mailbox import Actor, Mailbox

log = logging.getLogger("jobd.heart")


class Beat(msgspec.Struct, tag="beat"):
    """Beat now (after a reconnect, or from tests)."""


class Heart(Actor[Beat]):
    def __init__(
        self,
        mailbox: Mailbox[Beat],
        store: Store,
        *,
        daemon_id: str,
        lease_s: float,
        interval_s: float,
        status: Callable[[], tuple[str, bool]],
        running: Callable[[], list[tuple[int, int]]],
        cancel: Callable[[int], None],
        clock: Clock,
        lease_lost: Callable[[int, int], None] | None = None,
    ):
        super().__init__(mailbox.name, mailbox)
        self._store = store
        self._daemon_id = daemon_id
        self._lease_s = lease_s
        self._interval_s = interval_s
        self._status = status
        self._running = running
        self._cancel = cancel
        self._lease_lost = lease_lost
        self._clock = clock
        self.beats = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.beat()
            except StoreUnavailable as exc:
                log.warning("heartbeat failed: %s", exc, extra={"event": "heart.unavailable"})
            with trio.move_on_after(self._interval_s):
                await self.mailbox.receive()

    async def beat(self) -> None:
        status, draining = self._status()
        lost = await self._store.heartbeat(self._daemon_id, self._lease_s, status, draining,
                                           running=self._running())
        if self._lease_lost is not None:
            for job_id, token in lost:  # rescued or reclaimed while it ran: stop it now
                self._lease_lost(job_id, token)
        for job_id in await self._store.running_cancel_requests(self._daemon_id):
            self._cancel(job_id)
        self.beats += 1
