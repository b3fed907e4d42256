"""daemon/store/listen.py against a real Postgres: notifications arrive on a bounded trio
channel, each channel hears ("<channel>", "") after every (re)connect, a full channel
drops and counts, and the channel ends with the block."""

from __future__ import annotations

import pytest
import trio

CHANNELS = ["jobd_test_a", "jobd_test_b"]


class Drops:
    """An Observer that records dropped notifications (the rest of it is a no-op)."""

    def __init__(self) -> None:
        self.channels: list[str] = []
        self.dropped = trio.Event()

    def notification_dropped(self, channel: str) -> None:
        self.channels.append(channel)
        self.dropped.set()

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


async def notify(store, channel: str, payload: str) -> None:
    await store._execute("SELECT pg_notify($1, $2)", channel, payload)


async def test_notifications_arrive_after_one_empty_one_per_channel(store) -> None:
    with trio.fail_after(30):
        async with store.listen(CHANNELS) as notifications:
            assert {await notifications.receive() for _ in CHANNELS} == {(c, "") for c in CHANNELS}
            await notify(store, "jobd_test_b", "42")
            await notify(store, "jobd_test_a", "x")
            assert await notifications.receive() == ("jobd_test_b", "42")
            assert await notifications.receive() == ("jobd_test_a", "x")


async def test_a_reconnect_tells_every_channel_again(store, sql) -> None:
    with trio.fail_after(60):
        async with store.listen(CHANNELS) as notifications:
            assert {await notifications.receive() for _ in CHANNELS} == {(c, "") for c in CHANNELS}
            killed = await store._fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN%'")
            assert killed == 1
            assert {await notifications.receive() for _ in CHANNELS} == {(c, "") for c in CHANNELS}
            await notify(store, "jobd_test_a", "after")
            assert await notifications.receive() == ("jobd_test_a", "after")


async def test_a_full_channel_drops_and_counts(store) -> None:
    drops = Drops()
    store.observer = drops
    with trio.fail_after(30):
        async with store.listen(CHANNELS, buffer=1) as notifications:
            # Nobody reads: the first channel's reconnect notice fills the buffer.
            await drops.dropped.wait()
            assert drops.channels == ["jobd_test_b"]
            assert notifications.statistics().current_buffer_used == 1


async def test_the_channel_ends_with_the_block(store) -> None:
    with trio.fail_after(30):
        async with store.listen(CHANNELS) as notifications:
            pass
        seen = [note async for note in notifications]
    assert set(seen) <= {(c, "") for c in CHANNELS}
    with pytest.raises(trio.EndOfChannel):
        await notifications.receive()
