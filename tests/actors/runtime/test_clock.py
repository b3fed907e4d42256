from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import trio

from actors.runtime.clock import Clock, PinnedClock, TrioClock


async def test_trio_clock_follows_virtual_time(autojump_clock):
    clock: Clock = TrioClock()
    start = clock.now()
    await clock.sleep(3600)
    await clock.sleep_until(clock.now() + 60)
    assert clock.now() - start == pytest.approx(3660)
    assert clock.wall().tzinfo is UTC


async def test_pinned_clock_moves_wall_time_only_on_advance(autojump_clock):
    pinned = datetime(2024, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))
    clock = PinnedClock(pinned)
    assert clock.wall() == datetime(2024, 1, 1, tzinfo=UTC)
    await clock.sleep(100)
    assert clock.wall() == pinned
    before = trio.current_time()
    clock.advance(90)
    assert clock.wall() == pinned + timedelta(seconds=90)
    assert trio.current_time() == before


def test_pinned_clock_rejects_naive_datetimes():
    with pytest.raises(ValueError):
        PinnedClock(datetime(2024, 1, 1))
