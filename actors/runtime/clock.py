"""Where actors get time from, so timing logic runs on virtual time in tests.

`TrioClock` reads trio's clock; under `trio.testing.MockClock` that clock is virtual,
so no test double is needed for monotonic time. Wall time is separate: it is what goes
into SQL as a parameter, and `PinnedClock` holds it still until a test moves it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol

import trio


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds; only differences are meaningful."""
        ...

    async def sleep_until(self, deadline: float) -> None: ...

    async def sleep(self, seconds: float) -> None: ...

    def wall(self) -> datetime:
        """Timezone-aware UTC wall time."""
        ...


class TrioClock:
    def now(self) -> float:
        return trio.current_time()

    async def sleep_until(self, deadline: float) -> None:
        await trio.sleep_until(deadline)

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    def wall(self) -> datetime:
        return datetime.now(UTC)


class PinnedClock(TrioClock):
    """Wall time stands still until `advance()`; monotonic time is still trio's.

    The two are deliberately independent: advancing wall time must not fire trio
    timeouts, and MockClock autojumps must not move the time SQL sees.
    """

    def __init__(self, wall: datetime) -> None:
        if wall.tzinfo is None:
            raise ValueError("PinnedClock needs a timezone-aware datetime")
        self._wall = wall.astimezone(UTC)

    def wall(self) -> datetime:
        return self._wall

    def advance(self, seconds: float) -> None:
        self._wall += timedelta(seconds=seconds)
