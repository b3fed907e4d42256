"""bridge.Pool: trio-side connection pool for asyncpg, against a real Postgres."""

from __future__ import annotations

import asyncpg
import pytest
import trio

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
