"""The LISTEN connection: kept alive (probed, reconnected with backoff) while the daemon
runs. asyncpg calls back on the asyncio side, so the callback only puts (channel, payload)
into a bounded trio channel; the daemon's router reads it on the trio side. A full channel
drops the notification and counts it: a lost wake-up costs latency, not a job (the
dispatchers' poll is the fallback), while an unbounded buffer would let a NOTIFY flood
grow the daemon's memory without limit."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from actors.ports import StoreUnavailable
from daemon.store.base import StoreBase
from daemon.store.bridge import call, connect

log = logging.getLogger("jobd.store")

NOTIFY_BUFFER = 10_000


class Listening(StoreBase):
    @asynccontextmanager
    async def listen(
        self, channels: list[str], buffer: int = NOTIFY_BUFFER
    ) -> AsyncIterator[trio.MemoryReceiveChannel[tuple[str, str]]]:
        """Yield the notifications on `channels` as (channel, payload), while the block runs.

        After every (re)connect each channel gets ("<channel>", ""), because anything sent
        while we were away was lost and waiters must re-check. When the block ends the
        channel ends too (the reader's `async for` stops).
        """
        send, receive = trio.open_memory_channel[tuple[str, str]](buffer)
        async with send, trio.open_nursery() as nursery:
            nursery.start_soon(self._listen_forever, channels, send)
            yield receive
            nursery.cancel_scope.cancel()

    def _deliver(self, send: trio.MemorySendChannel[tuple[str, str]], channel: str,
                 payload: str) -> None:
        # Called from asyncpg's callback: nothing here may block or raise.
        try:
            send.send_nowait((channel, payload))
        except trio.WouldBlock:
            self.observer.notification_dropped(channel)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the daemon stopped listening; a late callback has nobody to tell

    async def _listen_forever(
        self, channels: list[str], send: trio.MemorySendChannel[tuple[str, str]]
    ) -> None:
        backoff = 0.1
        while True:
            lost = trio.Event()
            connection = None
            try:
                connection = await connect(self.url, self._timeout_s)
                connection.add_termination_listener(lambda _c, lost=lost: lost.set())
                for channel in channels:
                    await call(
                        connection.add_listener,
                        channel,
                        lambda _c, _pid, ch, payload: self._deliver(send, ch, payload),
                    )
                backoff = 0.1
                for channel in channels:
                    self._deliver(send, channel, "")
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
                if connection is not None and not connection.is_closed():
                    connection.terminate()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
