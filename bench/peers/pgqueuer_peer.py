"""pgqueuer driven through its documented API (AsyncpgDriver, Queries.enqueue with
lists, QueueManager entrypoints, qm.run). See harness.py for the modes."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg  # noqa: E402
import harness  # noqa: E402
from harness import REC  # noqa: E402
from pgqueuer.db import AsyncpgDriver  # noqa: E402
from pgqueuer.models import Job  # noqa: E402
from pgqueuer.qm import QueueManager  # noqa: E402
from pgqueuer.queries import Queries  # noqa: E402
from pgqueuer.types import QueueExecutionMode  # noqa: E402


class Adapter:
    async def open(self, args) -> None:
        self.conn = await asyncpg.connect(args.url)
        self.driver = AsyncpgDriver(self.conn)
        self.queries = Queries(self.driver)

    async def close(self) -> None:
        await self.conn.close()

    async def setup(self) -> None:
        await self.queries.install()

    async def clear(self) -> None:
        await self.queries.clear_queue()
        await self.queries.clear_queue_log()
        await self.queries.clear_statistics_log()

    async def enqueue(self, kind: str, bodies: list[dict]) -> None:
        n = len(bodies)
        await self.queries.enqueue([kind] * n, [json.dumps(b).encode() for b in bodies], [0] * n)

    async def enqueue_one(self, kind: str, body: dict) -> None:
        await self.queries.enqueue(kind, json.dumps(body).encode(), 0)

    async def work(self, concurrency: int, drain: bool, stop: asyncio.Event | None,
                   claim_batch: int = 0) -> None:
        qm = QueueManager(self.queries)

        @qm.entrypoint("noop")
        async def noop(job: Job) -> None:
            REC.start()
            REC.finish()

        @qm.entrypoint("lat")
        async def lat(job: Job) -> None:
            REC.start()
            REC.latency(json.loads(job.payload)["t"])
            REC.finish()

        @qm.entrypoint("sleep")
        async def sleep(job: Job) -> None:
            REC.sleeper_started()
            await asyncio.sleep(json.loads(job.payload)["seconds"])

        # Same ceiling as jobd (concurrency 200). Claims of up to 200 at once would not fit
        # pgqueuer's rule max_concurrent_tasks >= 2 * batch_size, so half of it by default;
        # bench/run.py also runs it at batch 10 ("pgqueuer b10") and reports both.
        runner = asyncio.create_task(qm.run(
            batch_size=claim_batch or max(1, concurrency // 2), max_concurrent_tasks=concurrency,
            mode=QueueExecutionMode.drain if drain else QueueExecutionMode.continuous))
        await harness.race(runner, stop, qm.shutdown.set)

if __name__ == "__main__":
    harness.main(Adapter())
