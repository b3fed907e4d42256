"""The notifier: LISTEN/NOTIFY notifications, routed to whoever they concern.

Messages it accepts, `(channel, payload)` on the trio channel the store's listener
fills (the asyncpg callback only puts them there, so no trio code runs inside an
asyncio callback):
- `("jobd_enqueued", queue)`: jobs may be claimable there; wake that queue's pool.
- `("jobd_cancel", job_id)`: a running job is to be cancelled; every pool is told.
- `("jobd_paused", queue)`: a pause changed; the pause set is read again.
- `("jobd_schedules", name)`: a schedule changed; the scheduler runs a pass (`Tick`).
- `("jobd_webhooks", name)`: a finish wrote webhook outbox rows; the courier claims.
- `(channel, "")`: sent after every (re)connect of the listener: anything may have been
  missed, so every pool is woken and the pauses are read again.

Anyone who can connect to the database can NOTIFY, so a payload is untrusted input: a
malformed one is dropped and counted (a warning at most once a minute), and nothing
one notification does can stop the notifier.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable

import trio

from actors.runtime.mailbox import Mailbox, MailboxClosed
from actors.services.scheduler import SchedulerMsg, Tick

log = logging.getLogger("jobd.notifier")

CHANNELS = ["jobd_enqueued", "jobd_cancel", "jobd_paused", "jobd_schedules", "jobd_webhooks"]
NOTIFY_WARN_EVERY_S = 60.0  # at most one "dropped notifications" warning a minute
_INT64_MAX = 2**63 - 1
_NAME_PAYLOAD = re.compile(r"[^\x00-\x1f\x7f]{1,255}")


class Notifier:
    """Long-lived (the listener's drop hook outlives restarts); `run` is its incarnation."""

    name = "notifier"

    def __init__(
        self,
        notifications: trio.MemoryReceiveChannel[tuple[str, str]],
        *,
        wake: Callable[[str | None], None],
        cancel: Callable[[int], None],
        refresh_pauses: Callable[[], Awaitable[None]],
        scheduler: Mailbox[SchedulerMsg],
        count_drop: Callable[[str], None],
        webhooks: Callable[[], None] = lambda: None,
    ):
        """`wake(queue)` (None: every queue) and `cancel(job_id)` must not block;
        `count_drop(channel)` counts a dropped notification (the metric)."""
        self._notifications = notifications
        self._wake = wake
        self._cancel = cancel
        self._refresh_pauses = refresh_pauses
        self._scheduler = scheduler
        self._count_drop = count_drop
        self._webhooks = webhooks
        self._drops = 0
        self._warned_at = -NOTIFY_WARN_EVERY_S
        self._overflowed = False
        self._pauses_stale = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            # One refresh at a time: a flood of jobd_paused notifications costs one query
            # per refresh, not one task and one query each.
            nursery.start_soon(self._refresh_pauses_loop)
            task_status.started()
            async for channel, payload in self._notifications:
                if self._overflowed:
                    # The listener dropped some because we were behind: as after a
                    # reconnect, anything may have been missed.
                    self._overflowed = False
                    for each in CHANNELS:
                        self.route(each, "")
                self.route(channel, payload)
            nursery.cancel_scope.cancel()

    def listener_full(self, channel: str, payload: str) -> None:
        """The listener's channel was full: that notification is lost (called by the
        listener in asyncio's callback, so it only counts and logs)."""
        self._overflowed = True
        self.drop(channel, payload, "the notifier is behind")

    def route(self, channel: str, payload: str) -> None:
        try:
            if not valid_payload(channel, payload):
                self.drop(channel, payload, "malformed payload")
                return
            self._route(channel, payload)
        except Exception as exc:  # noqa: BLE001 - contained: one notification, never the daemon
            self.drop(channel, payload, f"{type(exc).__name__}: {exc}")

    def _route(self, channel: str, payload: str) -> None:
        if channel == "jobd_paused" or (channel == "jobd_enqueued" and not payload):
            # Pauses changed somewhere (or we reconnected and may have missed it).
            self._pauses_stale.set()
        if channel == "jobd_enqueued":
            # An empty payload follows a (re)connect: anything may have been missed.
            self._wake(payload or None)
        elif channel == "jobd_cancel" and payload:
            self._cancel(int(payload))
        elif channel == "jobd_webhooks":
            self._webhooks()
        elif channel == "jobd_schedules":
            try:
                self._scheduler.tell_nowait(Tick())
            except (trio.WouldBlock, MailboxClosed):
                pass  # a full mailbox already holds a pass to run

    async def _refresh_pauses_loop(self) -> None:
        while True:
            await self._pauses_stale.wait()
            self._pauses_stale = trio.Event()
            # Whatever goes wrong costs this refresh (the next NOTIFY or reconnect
            # refreshes again), not the notifier.
            try:
                await self._refresh_pauses()
            except Exception:  # noqa: BLE001 - contained: one refresh, never the daemon
                log.exception("refreshing the pauses failed",
                              extra={"event": "pauses.refresh_failed"})

    def drop(self, channel: str, payload: str, why: str) -> None:
        self._count_drop(channel)
        self._drops += 1
        now = time.monotonic()
        if now - self._warned_at >= NOTIFY_WARN_EVERY_S:
            log.warning("dropped %d LISTEN notification(s) in the last %.0f s; latest on %s: "
                        "%s (payload %r)", self._drops, NOTIFY_WARN_EVERY_S, channel, why,
                        payload[:80], extra={"event": "notify.dropped", "channel": channel})
            self._warned_at = now
            self._drops = 0


def valid_payload(channel: str, payload: str) -> bool:
    """What jobd itself sends: a queue name (enqueued, paused), a job id (cancel), a
    schedule or webhook name (schedules, webhooks); empty after a (re)connect."""
    if not isinstance(payload, str):
        return False
    if payload == "":
        return True
    if channel == "jobd_cancel":
        return (payload.isascii() and payload.isdigit() and len(payload) <= 19
                and 0 < int(payload) <= _INT64_MAX)
    if channel in ("jobd_enqueued", "jobd_paused", "jobd_schedules", "jobd_webhooks"):
        return _NAME_PAYLOAD.fullmatch(payload) is not None
    return False
