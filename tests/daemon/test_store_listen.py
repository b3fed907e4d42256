"""daemon/store/listen.py against a real Postgres: notifications arrive on the bounded
trio channel the daemon owns, each channel hears ("<channel>", "") after every
(re)connect, one that finds the channel full goes to `on_full`, and the channel outlives
the listener."""

from __future__ import annotations

import trio

CHANNELS = ["jobd_test_a", "jobd_test_b"]


class Full:
    """The `on_full` hook: records what found the channel full."""

    def __init__(self) -> None:
        self.dropped: list[tuple[str, str]] = []
        self.event = trio.Event()

    def __call__(self, channel: str, payload: str) -> None:
        self.dropped.append((channel, payload))
        self.event.set()


async def notify(store, channel: str, payload: str) -> None:
    await store._execute("SELECT pg_notify($1, $2)", channel, payload)


async def test_notifications_arrive_after_one_empty_one_per_channel(store) -> None:
    send, notifications = trio.open_memory_channel[tuple[str, str]](100)
    with trio.fail_after(30):
        async with store.listen(CHANNELS, send, Full()):
            assert {await notifications.receive() for _ in CHANNELS} == {(c, "") for c in CHANNELS}
            await notify(store, "jobd_test_b", "42")
            await notify(store, "jobd_test_a", "x")
            assert await notifications.receive() == ("jobd_test_b", "42")
            assert await notifications.receive() == ("jobd_test_a", "x")


async def test_a_reconnect_tells_every_channel_again(store, sql) -> None:
    send, notifications = trio.open_memory_channel[tuple[str, str]](100)
    with trio.fail_after(60):
        async with store.listen(CHANNELS, send, Full()):
            assert {await notifications.receive() for _ in CHANNELS} == {(c, "") for c in CHANNELS}
            killed = await store._fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN%'")
            assert killed == 1
            assert {await notifications.receive() for _ in CHANNELS} == {(c, "") for c in CHANNELS}
            await notify(store, "jobd_test_a", "after")
            assert await notifications.receive() == ("jobd_test_a", "after")


async def test_a_full_channel_hands_the_notification_to_on_full(store) -> None:
    full = Full()
    send, notifications = trio.open_memory_channel[tuple[str, str]](1)
    with trio.fail_after(30):
        async with store.listen(CHANNELS, send, full):
            # Nobody reads: the first channel's reconnect notice fills the buffer.
            await full.event.wait()
            assert full.dropped == [("jobd_test_b", "")]
            assert notifications.statistics().current_buffer_used == 1


async def test_the_channel_outlives_the_listener(store) -> None:
    """The notifier keeps reading the same channel across a listener's end (and its own
    restarts); nothing arrives once the block is over."""
    send, notifications = trio.open_memory_channel[tuple[str, str]](100)
    with trio.fail_after(30):
        async with store.listen(CHANNELS, send, Full()):
            assert {await notifications.receive() for _ in CHANNELS} == {(c, "") for c in CHANNELS}
        await notify(store, "jobd_test_a", "late")
        await send.send(("jobd_test_b", "still open"))
        assert await notifications.receive() == ("jobd_test_b", "still open")
