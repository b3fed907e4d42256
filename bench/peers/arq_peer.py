"""arq (Redis) driven through its documented API (create_pool, ArqRedis.enqueue_job,
Worker with burst=True). --url is redis://host:port/db. See harness.py for the modes."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from arq import create_pool  # noqa: E402
from arq.connections import RedisSettings  # noqa: E402
from arq.worker import Worker, func  # noqa: E402
from harness import REC  # noqa: E402

QUEUE = "jobd-bench:arq"


async def noop(ctx) -> None:
    REC.start()
    REC.finish()


async def lat(ctx, t: float) -> None:
    REC.start()
    REC.latency(t)
    REC.finish()


async def sleep(ctx, seconds: float) -> None:
    REC.sleeper_started()
    await asyncio.sleep(seconds)


class Adapter:
    async def open(self, args) -> None:
        self.settings = RedisSettings.from_dsn(args.url)
        self.redis = await create_pool(self.settings, default_queue_name=QUEUE)

    async def close(self) -> None:
        await self.redis.aclose()

    async def setup(self) -> None:
        await self.clear()

    async def clear(self) -> None:
        # Only this bench's keys, in its own Redis database: never FLUSHDB a shared server.
        keys = [k async for k in self.redis.scan_iter(match="arq:*")]
        keys += [QUEUE]
        for i in range(0, len(keys), 1000):
            await self.redis.delete(*keys[i:i + 1000])

    async def enqueue(self, kind: str, bodies: list[dict]) -> None:
        # arq has no batch enqueue; its documented way is enqueue_job per job, which we
        # issue concurrently (the pool pipelines them).
        await asyncio.gather(*(self.redis.enqueue_job(kind, **b) for b in bodies))

    async def enqueue_one(self, kind: str, body: dict) -> None:
        await self.redis.enqueue_job(kind, **body)

    async def work(self, concurrency: int, drain: bool, stop: asyncio.Event | None) -> None:
        worker = Worker(
            functions=[func(noop, name="noop"), func(lat, name="lat"),
                       func(sleep, name="sleep", timeout=3600)],
            redis_pool=self.redis, queue_name=QUEUE, burst=drain, max_jobs=concurrency,
            handle_signals=False)
        runner = asyncio.create_task(worker.async_run())
        try:
            await harness.race(runner, stop, runner.cancel)
            await worker.close()
        except asyncio.CancelledError:  # arq's close() cancels its own tasks once more
            if not (stop is not None and stop.is_set()):
                raise


if __name__ == "__main__":
    harness.main(Adapter())
