"""bridge.Pool: trio-side connection pool for asyncpg, against a real Postgres."""

from __future__ import annotations

import asyncpg
import pytest
import trio

from actors.ports import StoreUnavailable
from daemon.store import bridge


async def _fetchval(connection, sql: str):
    return await connection.fetchval(sql)


async def _pid(connection) -> int:
    return await connection.fetchval("SELECT pg_backend_pid()")


@pytest.fixture
async def pool(fresh_database: str):
    async with bridge.open_loop():
        p = bridge.Pool(fresh_database, max_size=2, timeout_s=10)
        await p.open(1)
        try:
            yield p
        finally:
            await p.close()


async def call(pool: bridge.Pool, fn, *args):
    async with pool.connection() as connection:
        return await bridge.call(fn, connection, *args)


async def test_a_connection_is_reused_after_a_statement_error(pool):
    first = await call(pool, _pid)
    with pytest.raises(asyncpg.PostgresError):
        await call(pool, _fetchval, "SELECT * FROM no_such_table")
    with pytest.raises(bridge.ValueRejected):  # a bad value, translated
        await call(pool, _fetchval, "SELECT 1/0")
    assert await call(pool, _pid) == first


async def test_a_cancelled_statement_retires_its_connection(pool):
    first = await call(pool, _pid)
    with trio.move_on_after(0.2):
        await call(pool, _fetchval, "SELECT pg_sleep(5)")
    # Its state mid-protocol is unknown: the next caller gets a fresh connection.
    assert await call(pool, _pid) != first


async def test_at_most_max_size_connections_are_open_at_once(pool):
    inside = most = 0

    async def one() -> None:
        nonlocal inside, most
        async with pool.connection() as connection:
            inside += 1
            most = max(most, inside)
            await bridge.call(_fetchval, connection, "SELECT pg_sleep(0.05)")
            inside -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(one)
    assert most == 2


async def test_a_closed_pool_refuses_callers(pool):
    await pool.close()
    with pytest.raises(bridge.StoreUnavailable):
        await call(pool, _pid)


async def _terminate_idle(pool: bridge.Pool, url: str) -> None:
    """Kill the backends of the pool's idle connections, as pg_terminate_backend or a
    fast restart does, and return while they still look open on our side."""
    admin = await bridge.connect(url, 10)
    try:
        for connection in pool._idle:
            pid = connection.get_server_pid()
            await bridge.call(admin.fetchval, "SELECT pg_terminate_backend($1)", pid)
    finally:
        bridge.terminate(admin)


async def test_a_connection_killed_while_idle_is_unavailable_and_dropped(pool, fresh_database):
    await pool.open(2)
    await _terminate_idle(pool, fresh_database)
    # The server's FATAL has arrived, the EOF maybe not: asyncpg refuses the statement
    # with InternalClientError("cannot switch to state ..."). That is an outage, not a bug.
    for _ in range(2):
        try:
            await call(pool, _pid)
        except bridge.StoreUnavailable:
            pass
    assert isinstance(await call(pool, _pid), int)


async def test_the_store_reruns_a_statement_refused_by_a_stale_connection(store):
    pool = store._pool
    await pool.open(3)
    await _terminate_idle(pool, store.url)
    # Refused before it was sent, so it is safe to run again on a fresh connection: the
    # caller sees nothing of it. (If the statement went out before the FATAL was read,
    # its fate is unknown: that one call is unavailable, and the next works.)
    failures = 0
    for _ in range(3):
        try:
            await store.ping()
        except StoreUnavailable:
            failures += 1
    assert failures <= 1
    await store.ping()
    assert store.healthy


async def _orphan_error() -> None:
    import asyncio

    future = asyncio.get_running_loop().create_future()
    future.set_exception(ConnectionError("unexpected connection_lost() call"))
    del future  # "Future exception was never retrieved", as a cancelled connect leaves


async def test_an_unretrieved_asyncio_error_is_logged_not_raised(caplog):
    import gc

    # An asyncio error nobody waits for is logged and counted, never raised into trio.
    async with bridge.open_loop():
        await bridge.call(_orphan_error)
        gc.collect()
        await trio.sleep(0.05)
    assert any(r.__dict__.get("event") == "store.loop_error" for r in caplog.records)

    counted = []
    async with bridge.open_loop(on_error=lambda: counted.append(1)):
        await bridge.call(_orphan_error)
        gc.collect()
        await trio.sleep(0.05)
    assert counted == [1]


@pytest.mark.parametrize("errcode", ["disk_full", "out_of_memory", "too_many_connections",
                                     "io_error", "read_only_sql_transaction",
                                     "admin_shutdown", "cannot_connect_now"])
async def test_a_server_that_cannot_do_the_work_now_is_unavailable(pool, errcode):
    # What a full disk (or a failover, or a restart) looks like to jobd: not a bug in a
    # statement, an outage to wait out like any other.
    sql = f"DO $$ BEGIN RAISE EXCEPTION 'simulated' USING ERRCODE = '{errcode}'; END $$"
    with pytest.raises(StoreUnavailable):
        await call(pool, _fetchval, sql)
    assert isinstance(await call(pool, _pid), int)
