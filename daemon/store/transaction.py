"""The handler transaction: one pooled connection in one transaction, for a handler's own
SQL (`ctx.transaction()`) and for finishing its attempt in that same transaction, fenced
by the lease token (AttemptRunner's tx-complete path)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import trio

from actors.ports import LeaseLost, Outcome, StoreUnavailable
from daemon.store.base import StoreBase
from daemon.store.bridge import StaleConnection, call
from daemon.store.jobs import outcome_columns
from daemon.store.sql import jobs as jobs_sql


class HandlerTransaction:
    """One connection in one transaction; see actors.ports.Transaction."""

    def __init__(self, connection: asyncpg.Connection):
        self._connection = connection

    async def execute(self, sql: str, *args: Any) -> str:
        return await call(self._connection.execute, sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return await call(self._connection.fetch, sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return await call(self._connection.fetchrow, sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await call(self._connection.fetchval, sql, *args)

    async def finish(self, outcome: Outcome) -> bool:
        rows = await call(self._connection.fetch, jobs_sql.FINISH_MANY, *outcome_columns([outcome]))
        if not any(r["id"] is not None for r in rows):
            raise LeaseLost(f"job {outcome.id}: this attempt no longer holds the lease")
        return True


class Transactions(StoreBase):
    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[HandlerTransaction]:
        if self._pool is None:
            raise StoreUnavailable("store is not connected")
        async with self._transaction_connection() as (connection, tx):
            try:
                yield HandlerTransaction(connection)
            except BaseException:
                # Bounded: against a hung server the rollback would wait for the command
                # timeout. If it fails the pool drops the connection (still in a
                # transaction), and the server rolls back when it sees it gone.
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        await call(tx.rollback)
                    except StoreUnavailable:
                        pass
                raise
            else:
                await call(tx.commit)

    @asynccontextmanager
    async def _transaction_connection(self) -> AsyncIterator[tuple[asyncpg.Connection, Any]]:
        assert self._pool is not None
        for fresh in (False, True):
            async with self._pool.connection(fresh=fresh) as connection:
                tx = connection.transaction()
                try:
                    await call(tx.start)
                except StaleConnection:
                    if fresh:
                        raise
                    continue  # nothing was sent: begin again on a fresh connection
                yield connection, tx
                return
