"""Whether this daemon serves, as each asker wants it said: `jobctl ping` (a Pong),
HTTP /readyz (why not, or None), the metrics' ready gauge, and systemd's STATUS= line.

One place decides, so the four never disagree: ready means started and not stopping,
not draining, and the database answering.
"""

from __future__ import annotations

from collections.abc import Callable

from daemon import __version__
from daemon.store import PgStore
from protocol import commands as c


class Readiness:
    def __init__(self, daemon_id: str, region: str, *, draining: Callable[[], bool],
                 running: Callable[[], int]):
        self._daemon_id = daemon_id
        self._region = region
        self._draining = draining
        self._running = running
        self.store: PgStore | None = None
        self.started = False  # set once serving, cleared when the drain begins

    def _store_healthy(self) -> bool:
        return bool(self.store and self.store.healthy)

    def status_line(self) -> str:
        state = "draining" if self._draining() else "ready"
        return f"{state}; {self._running()} jobs running; region {self._region}"

    def pong(self) -> c.Pong:
        return c.Pong(daemon_id=self._daemon_id, region=self._region, version=__version__,
                      ready=self.started and self._store_healthy(), draining=self._draining())

    async def http_readiness(self) -> str | None:
        """Why /readyz says no, or None."""
        if self.store is None or not self.store.healthy:
            return "database unavailable"
        if not await self.store.migrations_current():
            return "database schema is behind this daemon"
        if self._draining():
            return "draining"
        if not self.started:
            return "starting"
        return None

    def ready_now(self) -> bool:
        return self.started and not self._draining() and self._store_healthy()
