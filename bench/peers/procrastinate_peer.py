"""procrastinate driven through its documented API (App, PsycopgConnector, tasks,
batch_defer_async, run_worker_async). See harness.py for the modes."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness import REC  # noqa: E402
from procrastinate import App, PsycopgConnector  # noqa: E402

QUEUE = "bench"


class Adapter:
    async def open(self, args) -> None:
        # The same pool ceiling as jobd's default (database.pool_max = 10).
        self.app = App(connector=PsycopgConnector(conninfo=args.url, min_size=2, max_size=10))

        @self.app.task(name="noop", queue=QUEUE)
        async def noop() -> None:
            REC.start()
            REC.finish()

        @self.app.task(name="lat", queue=QUEUE)
        async def lat(t: float) -> None:
            REC.start()
            REC.latency(t)
            REC.finish()

        @self.app.task(name="sleep", queue=QUEUE)
        async def sleep(seconds: float) -> None:
            REC.sleeper_started()
            await asyncio.sleep(seconds)

        self.tasks = {"noop": noop, "lat": lat, "sleep": sleep}
        self._ctx = self.app.open_async()
        await self._ctx.__aenter__()

    async def close(self) -> None:
        await self._ctx.__aexit__(None, None, None)

    async def setup(self) -> None:
        await self.app.schema_manager.apply_schema_async()

    async def clear(self) -> None:
        await self.app.connector.execute_query_async(
            "TRUNCATE procrastinate_jobs, procrastinate_events RESTART IDENTITY CASCADE")

    async def enqueue(self, kind: str, bodies: list[dict]) -> None:
        await self.tasks[kind].batch_defer_async(*bodies)

    async def enqueue_one(self, kind: str, body: dict) -> None:
        await self.tasks[kind].defer_async(**body)

    async def work(self, concurrency: int, drain: bool, stop: asyncio.Event | None) -> None:
        worker = asyncio.create_task(self.app.run_worker_async(
            queues=[QUEUE], concurrency=concurrency, wait=not drain,
            install_signal_handlers=False))
        # procrastinate documents cancelling the worker task as a graceful stop.
        await harness.race(worker, stop, worker.cancel)

if __name__ == "__main__":
    harness.main(Adapter())
