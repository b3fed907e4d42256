"""Forward-only numbered migrations, applied once however many daemons start at once."""

from __future__ import annotations

import logging
import re
from importlib import resources

import asyncpg

log = logging.getLogger("jobd.store")

# Any constant both sides agree on; it only has to be unlikely to clash with the app's.
_MIGRATION_LOCK = 0x6A6F6264  # "jobd"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def available() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) for every migration shipped with this build."""
    found = []
    for entry in resources.files("daemon.store").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


def latest_version() -> int:
    return available()[-1][0]


async def apply(connection: asyncpg.Connection) -> list[str]:
    """Apply what is missing; returns the names applied. Runs on the asyncio side."""
    applied: list[str] = []
    await connection.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await connection.execute(
            "CREATE SCHEMA IF NOT EXISTS jobd;"
            "CREATE TABLE IF NOT EXISTS jobd.migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await connection.fetch("SELECT version FROM jobd.migrations")}
        for version, name, sql in available():
            if version in done:
                continue
            async with connection.transaction():
                await connection.execute(sql)
                await connection.execute(
                    "INSERT INTO jobd.migrations (version, name) VALUES ($1, $2)", version, name
                )
            log.info("applied migration %s", name, extra={"event": "store.migrated"})
            applied.append(name)
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


async def current_version(connection: asyncpg.Connection) -> int:
    exists = await connection.fetchval("SELECT to_regclass('jobd.migrations') IS NOT NULL")
    if not exists:
        return 0
    return await connection.fetchval("SELECT coalesce(max(version), 0) FROM jobd.migrations")
