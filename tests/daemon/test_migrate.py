"""daemon/store/migrate.py against a real Postgres: every shipped migration applies once,
in version order, under the advisory lock, however many daemons start at once."""

from __future__ import annotations

import asyncio

import asyncpg

from daemon.store import migrate
from tests.support import run_async

SHIPPED = [name for _, name, _ in migrate.available()]


async def applied_rows(conn: asyncpg.Connection) -> list[tuple[int, str, object]]:
    rows = await conn.fetch("SELECT version, name, applied_at FROM jobd.migrations ORDER BY version")
    return [(r["version"], r["name"], r["applied_at"]) for r in rows]


def test_the_shipped_migrations_are_numbered_and_unique() -> None:
    versions = [version for version, _, _ in migrate.available()]
    assert versions == sorted(set(versions))
    assert migrate.latest_version() == versions[-1]


def test_migrations_apply_in_order_and_a_second_run_is_a_no_op(fresh_database) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(fresh_database)
        try:
            assert await migrate.current_version(conn) == 0
            assert await migrate.apply(conn) == SHIPPED
            first = await applied_rows(conn)
            assert [name for _, name, _ in first] == SHIPPED
            # In version order: each one's applied_at is no earlier than the one before.
            times = [at for _, _, at in first]
            assert times == sorted(times)
            assert await migrate.current_version(conn) == migrate.latest_version()

            assert await migrate.apply(conn) == []
            assert await applied_rows(conn) == first  # nothing re-applied, nothing touched
        finally:
            await conn.close()

    run_async(main)


def test_a_migration_waits_for_the_advisory_lock(fresh_database) -> None:
    """While another session holds the migration lock, apply() changes nothing; it runs
    when the lock is released."""

    async def main() -> None:
        holder = await asyncpg.connect(fresh_database)
        migrator = await asyncpg.connect(fresh_database)
        try:
            await holder.execute("SELECT pg_advisory_lock($1)", migrate._MIGRATION_LOCK)
            applying = asyncio.create_task(migrate.apply(migrator))
            pid = migrator.get_server_pid()
            # The signal: the migrator's backend is queued on the advisory lock.
            while True:
                if await holder.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1"
                    " AND locktype = 'advisory' AND NOT granted)", pid,
                ):
                    break
                await asyncio.sleep(0.01)
            assert not applying.done()
            assert await holder.fetchval("SELECT to_regclass('jobd.migrations')") is None
            await holder.execute("SELECT pg_advisory_unlock($1)", migrate._MIGRATION_LOCK)
            assert await asyncio.wait_for(applying, 60) == SHIPPED
            # apply() releases the lock it took: the holder can take it again at once.
            assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", migrate._MIGRATION_LOCK)
        finally:
            await holder.close()
            await migrator.close()

    run_async(main)


def test_concurrent_migrations_do_not_collide(fresh_database) -> None:
    """Daemons starting together: one applies everything, the others find it done."""

    async def main() -> None:
        conns = [await asyncpg.connect(fresh_database) for _ in range(3)]
        try:
            results = await asyncio.gather(*(migrate.apply(c) for c in conns))
            assert sorted(results, key=len) == [[], [], SHIPPED]
            rows = await applied_rows(conns[0])
            assert [name for _, name, _ in rows] == SHIPPED  # each exactly once
            for conn in conns:
                assert await migrate.current_version(conn) == migrate.latest_version()
        finally:
            for conn in conns:
                await conn.close()

    run_async(main)
