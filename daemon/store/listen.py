"""The LISTEN connection: kept alive (probed, reconnected with backoff) while the daemon
runs. asyncpg calls back on the loop thread; bridge.in_trio hands the callback to trio, where
it only puts (channel, payload) into a bounded trio channel the daemon owns; the notifier
reads it there. A full channel drops the notification and says so (`on_full`): a lost
wake-up costs latency, not a job (the dispatchers' poll is the fallback, and the notifier
re-checks everything), while an unbounded buffer would let a NOTIFY flood grow the
daemon's memory without limit."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

from actors.ports import StoreUnavailable
from daemon.store.base import StoreBase
from daemon.store.bridge import add_termination_listener, call, connect, in_trio, terminate

log = logging.getLogger("jobd.store")

class Listening(StoreBase):
    @asynccontextmanager
    async def listen(self, channels: list[str], send: trio.MemorySendChannel[tuple[str, str]],
                     on_full: Callable[[str, str], None]) -> AsyncIterator[None]:
        """Put the notifications on `channels` into `send` as (channel, payload) while the
        block runs; one that finds `send` full goes to `on_full(channel, payload)` instead.

        After every (re)connect each channel gets ("<channel>", ""), because anything sent
        while we were away was lost and waiters must re-check. `send` stays open: its
        reader outlives a listener (and a reader restarted meanwhile finds it again).
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen_forever, channels, send, on_full)
            yield
            nursery.cancel_scope.cancel()

    @staticmethod
    def _deliver(send: trio.MemorySendChannel[tuple[str, str]],
                 on_full: Callable[[str, str], None], channel: str, payload: str) -> None:
        # Called (on the trio side) for asyncpg's callback: nothing here may block or raise.
        try:
            send.send_nowait((channel, payload))
        except trio.WouldBlock:
            on_full(channel, payload)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the daemon stopped listening; a late callback has nobody to tell

    async def _listen_forever(self, channels: list[str],
                              send: trio.MemorySendChannel[tuple[str, str]],
                              on_full: Callable[[str, str], None]) -> None:
        backoff = 0.1
        while True:
            lost = trio.Event()
            connection = None
            try:
                connection = await connect(self.url, self._timeout_s)
                # Bound now: a late callback of an old connection must not set a new `lost`.
                await add_termination_listener(connection, partial(_set_lost, lost))
                deliver = in_trio(
                    lambda _c, _pid, ch, payload: self._deliver(send, on_full, ch, payload))
                for channel in channels:
                    await call(connection.add_listener, channel, deliver)
                backoff = 0.1
                for channel in channels:
                    self._deliver(send, on_full, channel, "")
                while not lost.is_set():
                    # A half-open TCP connection never terminates by itself; probe it.
                    with trio.move_on_after(15):
                        await lost.wait()
                    if not lost.is_set():
                        await call(connection.fetchval, "SELECT 1")
            except StoreUnavailable as exc:
                log.warning("LISTEN connection lost: %s", exc, extra={"event": "store.listen_lost"})
            except Exception:  # noqa: BLE001 - a listener that dies would stop every wake-up
                log.exception("LISTEN connection failed; reconnecting",
                              extra={"event": "store.listen_lost"})
            finally:
                if connection is not None:
                    terminate(connection)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


def _set_lost(lost: trio.Event, _connection: Any) -> None:
    lost.set()
