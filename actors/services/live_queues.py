"""Which queues some daemon serves, for the two answers that depend on it: an enqueue
for a queue nobody serves gets a warning, a pause of a queue nobody serves or declares
is refused (almost always a typo).

The store knows the queues of live daemons (heartbeat younger than `live_s`); this
keeps that answer a few seconds, so a daemon enqueueing for queues other daemons serve
does not pay a round trip per enqueue. A queue found unserved is asked afresh the first
time (a daemon may have just started serving it), then not again for a second: a
producer filling a queue no daemon serves yet (a backlog before a deploy) would
otherwise pay a round trip per job.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from actors.ports import NewJob, Store
from protocol.errors import NotFound

LIVE_QUEUES_TTL_S = 5.0
MISSING_QUEUE_TTL_S = 1.0


def unserved_warning(missing: list[str], served: set[str]) -> str:
    """The warning an enqueue carries (socket, HTTP and the direct producer alike)."""
    names = ", ".join(sorted(served)) or "none"
    return (f"no live daemon serves queue {', '.join(map(repr, missing))}: the job waits "
            f"until one does (queues served: {names})")


class LiveSet:
    """The cache rule both enqueue paths share (this module's docstring): whether a
    fresh answer is needed for the queues `wanted`, on a monotonic clock of the caller's."""

    def __init__(self) -> None:
        self.at = -float("inf")
        self.queues: set[str] = set()
        self._missing_since: dict[str, float] = {}  # queue -> when an answer lacked it

    def stale(self, now: float, wanted: set[str] | None) -> bool:
        if wanted is None or now - self.at > LIVE_QUEUES_TTL_S:
            return True
        return any(now - self._missing_since.get(q, -float("inf")) > MISSING_QUEUE_TTL_S
                   for q in wanted - self.queues)

    def update(self, now: float, queues: set[str], wanted: set[str] | None) -> None:
        self.at, self.queues = now, queues
        self._missing_since = {q: now for q in (wanted or set()) - queues}


class LiveQueues:
    """`here()`: the queues this daemon serves; `declared()`: those its config names."""

    def __init__(self, store: Store, *, here: Callable[[], set[str]],
                 declared: Callable[[], set[str]], live_s: float):
        self._store = store
        self._here = here
        self._declared = declared
        self._live_s = live_s
        self._cache = LiveSet()

    async def _live(self, wanted: set[str] | None = None) -> set[str]:
        """Queues live daemons serve. Kept a few seconds when it holds all `wanted`,
        and while a queue it lacks was found missing less than a second ago."""
        if self._cache.stale(trio.current_time(), wanted):
            queues = set(await self._store.live_queues(self._live_s))
            self._cache.update(trio.current_time(), queues, wanted)
        return self._cache.queues

    async def unserved(self, rows: list[NewJob]) -> str | None:
        """A warning naming the queues of `rows` that no live daemon serves, else None.

        The common case (this daemon serves the queue) costs no round trip."""
        here = self._here()
        asked = sorted({r.queue for r in rows} - here)
        if not asked:
            return None
        live = await self._live(set(asked))
        missing = [q for q in asked if q not in live]
        if not missing:
            return None
        return unserved_warning(missing, live | here)

    async def check_pausable(self, queue: str) -> None:
        """Pausing a queue nothing serves or declares is almost always a typo: refuse it."""
        here = self._here() | self._declared()
        if queue in here:
            return
        live = await self._live()
        if queue in live:
            return
        known = sorted(here | live)
        raise NotFound(f"no live daemon serves queue {queue!r} and the config does not "
                       f"declare it (known queues: {', '.join(known) or 'none'})",
                       details={"queue": queue, "queues": known})
