"""Command line shared by the peer drivers; each driver supplies an adapter object.

    python bench/peers/<peer>.py MODE --url URL [options]

Modes: setup, clear, enqueue-bulk, enqueue-single, enqueue-concurrent (--producers
producers, each on its own connection, enqueueing one job at a time), work (drain the
queue, then exit),
serve (run until --expect jobs ran; latency jobs record enqueue->start), paced
(enqueue latency jobs at --rate), sleepers (worker whose sleep jobs block until killed).
Events go to stdout as lines starting with "@": @ready, @running N, @result {json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from typing import Any


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def emit(tag: str, payload: Any = "") -> None:
    if not isinstance(payload, str):
        payload = json.dumps(payload)
    print(f"@{tag} {payload}".rstrip(), flush=True)


class Recorder:
    """What the handlers report: first start, last finish, count, latencies."""

    def __init__(self) -> None:
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.cpu_first: float | None = None
        self.lat_ms: list[float] = []
        self.expect: int | None = None
        self.done: asyncio.Event | None = None
        self.running = 0

    def start(self) -> None:
        if self.first is None:
            self.first = time.time()
            self.cpu_first = cpu_self()

    def finish(self) -> None:
        self.count += 1
        self.last = time.time()
        if self.expect is not None and self.count >= self.expect and self.done is not None:
            self.done.set()

    def latency(self, t: float) -> None:
        self.lat_ms.append((time.time() - t) * 1000)

    def sleeper_started(self) -> None:
        self.running += 1
        if self.expect is not None and self.running == self.expect:
            emit("running", str(self.running))


REC = Recorder()


async def race(runner: asyncio.Task, stop: asyncio.Event | None, on_stop) -> None:
    """Wait for the worker task to end by itself or for `stop`; then `on_stop()`."""
    if stop is None:
        await runner
        return
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not runner.done():
        on_stop()
    try:
        await runner
    except asyncio.CancelledError:
        pass


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["setup", "clear", "enqueue-bulk", "enqueue-single",
                                    "enqueue-concurrent", "work", "serve", "paced", "sleepers"])
    p.add_argument("--url", required=True)
    p.add_argument("--n", type=int, default=0)
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--kind", default="noop")
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--seconds", type=float, default=0.0, help="sleep job duration")
    p.add_argument("--max-seconds", type=float, default=0.0, help="work: stop after this long")
    p.add_argument("--producers", type=int, default=16, help="enqueue-concurrent")
    p.add_argument("--claim-batch", type=int, default=0,
                   help="work/serve: the peer's claim batch size (0: its bench default)")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                   help="the event loop the peer runs on")
    return p.parse_args(argv)


async def paced(enqueue_lat, rate: float, n: int, tick: float = 0.005) -> dict:
    """Enqueue n latency jobs at `rate`/s; each carries its send time. `enqueue_lat(ts)`."""
    sent = 0
    t0 = time.perf_counter()
    while sent < n:
        due = min(n, int((time.perf_counter() - t0) * rate) + 1)
        if due > sent:
            now = time.time()
            await enqueue_lat([now] * (due - sent))
            sent = due
        await asyncio.sleep(max(0.0, t0 + sent / rate - time.perf_counter()) if rate < 1 / tick
                            else tick)
    return {"sent": sent, "achieved_rate": sent / (time.perf_counter() - t0)}


async def run(adapter: Any, args: argparse.Namespace) -> None:
    """adapter: async setup(), clear(), enqueue(kind, list_of_args_dicts),
    enqueue_one(kind, args), work(concurrency, drain: bool, stop: asyncio.Event | None)."""
    await adapter.open(args)
    try:
        if args.mode == "setup":
            await adapter.setup()
            emit("result", {})
        elif args.mode == "clear":
            await adapter.clear()
            emit("result", {})
        elif args.mode == "enqueue-bulk":
            body = {"seconds": args.seconds} if args.kind == "sleep" else {}
            t = time.perf_counter()
            for start in range(0, args.n, args.batch):
                await adapter.enqueue(args.kind, [body] * min(args.batch, args.n - start))
            emit("result", {"jobs_per_s": args.n / (time.perf_counter() - t)})
        elif args.mode == "enqueue-single":
            t = time.perf_counter()
            for _ in range(args.n):
                await adapter.enqueue_one(args.kind, {})
            emit("result", {"jobs_per_s": args.n / (time.perf_counter() - t)})
        elif args.mode == "enqueue-concurrent":
            producers = [type(adapter)() for _ in range(args.producers)]
            for p in producers:
                await p.open(args)
            shares = [args.n // len(producers) + (i < args.n % len(producers))
                      for i in range(len(producers))]

            async def produce(p: Any, share: int) -> None:
                for _ in range(share):
                    await p.enqueue_one(args.kind, {})

            try:
                t = time.perf_counter()
                await asyncio.gather(*(produce(p, k) for p, k in zip(producers, shares, strict=True)))
                emit("result", {"jobs_per_s": args.n / (time.perf_counter() - t)})
            finally:
                for p in producers:
                    await p.close()
        elif args.mode == "paced":
            async def lat(ts: list[float]) -> None:
                if len(ts) == 1:
                    await adapter.enqueue_one("lat", {"t": ts[0]})
                else:
                    await adapter.enqueue("lat", [{"t": t} for t in ts])
            emit("result", await paced(lat, args.rate, args.n))
        elif args.mode in ("work", "serve", "sleepers"):
            stop = None
            if args.mode == "serve":
                REC.expect, REC.done = args.expect, asyncio.Event()
                stop = REC.done
            elif args.mode == "sleepers":
                REC.expect, stop = args.expect, asyncio.Event()  # never set: killed
            if args.mode == "work" and args.max_seconds:
                stop = asyncio.Event()
                asyncio.get_running_loop().call_later(args.max_seconds, stop.set)
            cpu0 = cpu_self()
            emit("ready")
            await adapter.work(args.concurrency, drain=args.mode == "work", stop=stop,
                               **({"claim_batch": args.claim_batch} if args.claim_batch else {}))
            cpu1 = cpu_self()
            emit("result", {
                "count": REC.count, "first": REC.first, "last": REC.last,
                "cpu_s": cpu1 - (REC.cpu_first if REC.cpu_first is not None else cpu0),
                "lat_ms": REC.lat_ms,
            })
    finally:
        await adapter.close()


def main(adapter: Any, argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        asyncio.run(run(adapter, args))
    except BaseException as exc:  # report, so the orchestrator can put it in the table
        if isinstance(exc, KeyboardInterrupt):
            raise
        emit("error", {"error": f"{type(exc).__name__}: {exc}"[:500]})
        sys.exit(1)
