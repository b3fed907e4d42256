"""Per-call cost of reaching asyncpg from trio, by bridge: trio-asyncio; trio as a guest on an
asyncio or uvloop host loop; asyncpg on its own asyncio or uvloop thread. Sequential
`SELECT $1`, N calls; wall and CPU per call. Run each variant in its own process:

    pip install asyncpg trio trio-asyncio uvloop
    for v in asyncio uvloop trio_asyncio guest guest_uv thread thread_uv; do
        DSN=postgresql://postgres@127.0.0.1:5432/postgres python bridge_bench.py $v
    done

From the repo (trio-asyncio is no longer a jobd dependency: the daemon's bridge is the
thread_uv variant; `.venv/bin/pip install trio-asyncio` to run trio_asyncio):
`N=5000 .venv/bin/python bench/bridge_bench.py <variant>` per variant, 3 reps; raw output
goes to bench/results/bridge-<UTC timestamp>.txt. Note that CPU is the process's
(`time.process_time`), so the thread variants count both threads.
"""
import asyncio
import os
import sys
import threading
import time

import asyncpg
import trio

DSN = os.environ.get("DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
N = int(os.environ.get("N", 5000))


def report(name, wall, cpu):
    print(f"{name:32s} wall {wall / N * 1e6:7.1f} us/call   cpu {cpu / N * 1e6:7.1f} us/call", flush=True)


async def _loop(conn):
    for i in range(200):
        await conn.fetchval("SELECT $1::int", i)
    w, c = time.perf_counter(), time.process_time()
    for i in range(N):
        await conn.fetchval("SELECT $1::int", i)
    return time.perf_counter() - w, time.process_time() - c


def native(loop_factory=None, name="asyncio native"):
    async def main():
        conn = await asyncpg.connect(DSN)
        r = await _loop(conn)
        await conn.close()
        return r
    if loop_factory:
        import uvloop
        r = uvloop.run(main())
    else:
        r = asyncio.run(main())
    report(name, *r)


def via_trio_asyncio():
    import trio_asyncio

    async def main():
        async with trio_asyncio.open_loop():
            conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(DSN)
            f = trio_asyncio.aio_as_trio(conn.fetchval)
            for i in range(200):
                await f("SELECT $1::int", i)
            w, c = time.perf_counter(), time.process_time()
            for i in range(N):
                await f("SELECT $1::int", i)
            r = time.perf_counter() - w, time.process_time() - c
            await trio_asyncio.aio_as_trio(conn.close)()
            return r
    report("trio + trio-asyncio", *trio.run(main))


def via_guest(use_uvloop):
    """Trio as a guest on the asyncio (or uvloop) host loop; asyncpg native on the host."""
    async def trio_main(conn, loop):
        token = trio.lowlevel.current_trio_token()

        async def call(coro):
            ev = trio.Event()
            box = []
            def done(fut):
                box.append(fut)
                token.run_sync_soon(ev.set)
            loop.create_task(coro).add_done_callback(done)
            await ev.wait()
            return box[0].result()

        for i in range(200):
            await call(conn.fetchval("SELECT $1::int", i))
        w, c = time.perf_counter(), time.process_time()
        for i in range(N):
            await call(conn.fetchval("SELECT $1::int", i))
        return time.perf_counter() - w, time.process_time() - c

    async def host():
        loop = asyncio.get_running_loop()
        conn = await asyncpg.connect(DSN)
        done_fut = loop.create_future()
        def done_callback(outcome):
            done_fut.set_result(outcome)
        trio.lowlevel.start_guest_run(
            trio_main, conn, loop,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            done_callback=done_callback,
            host_uses_signal_set_wakeup_fd=True,
        )
        outcome = await done_fut
        await conn.close()
        return outcome.unwrap()
    if use_uvloop:
        import uvloop
        r = uvloop.run(host())
    else:
        r = asyncio.run(host())
    report("trio guest on " + ("uvloop" if use_uvloop else "asyncio"), *r)


def via_thread(use_uvloop):
    """asyncpg on its own event loop thread; trio awaits run_coroutine_threadsafe futures."""
    if use_uvloop:
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    conn = asyncio.run_coroutine_threadsafe(asyncpg.connect(DSN), loop).result()

    async def main():
        token = trio.lowlevel.current_trio_token()

        async def call(coro):
            ev = trio.Event()
            fut = asyncio.run_coroutine_threadsafe(coro, loop)
            fut.add_done_callback(lambda f: token.run_sync_soon(ev.set))
            await ev.wait()
            return fut.result()

        for i in range(200):
            await call(conn.fetchval("SELECT $1::int", i))
        w, c = time.perf_counter(), time.process_time()
        for i in range(N):
            await call(conn.fetchval("SELECT $1::int", i))
        return time.perf_counter() - w, time.process_time() - c
    r = trio.run(main)
    asyncio.run_coroutine_threadsafe(conn.close(), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    report("trio + asyncpg on " + ("uvloop" if use_uvloop else "asyncio") + " thread", *r)


if __name__ == "__main__":
    v = sys.argv[1]
    {"asyncio": lambda: native(), "uvloop": lambda: native(True, "uvloop native"),
     "trio_asyncio": via_trio_asyncio, "guest": lambda: via_guest(False), "guest_uv": lambda: via_guest(True),
     "thread": lambda: via_thread(False), "thread_uv": lambda: via_thread(True)}[v]()
