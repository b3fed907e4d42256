"""Session-wide fixtures shared by all test packages.

Postgres: set JOBD_TEST_DATABASE_URL to test against an existing server; otherwise a
private, durability-off cluster (daemon.embedded) is started once per session.
Fixtures here are sync on purpose (pytest-trio runs async tests in trio).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from actors.handlers import HANDLERS, Handlers
from daemon.embedded import EmbeddedPostgres
from daemon.store import PgStore, bridge
from tests.support import JobdProcess, Sql

TEST_DATABASE_URL_ENV = "JOBD_TEST_DATABASE_URL"


# --------------------------------------------------------------------------- helpers


def _url_with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def _run_sql(url: str, sql: str) -> None:
    """Run one statement with asyncpg on a private event loop in a helper thread."""
    async def main() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    errors: list[BaseException] = []

    def runner() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # re-raised in the calling thread
            errors.append(e)

    t = threading.Thread(target=runner, name="pg-admin")
    t.start()
    t.join()
    if errors:
        raise errors[0]


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --------------------------------------------------------------------------- Postgres


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[EmbeddedPostgres | None]:
    """The session's embedded cluster, or None when JOBD_TEST_DATABASE_URL is set."""
    if os.environ.get(TEST_DATABASE_URL_ENV):
        yield None
        return
    # A private directory, not pytest's tmp tree: a concurrent pytest session prunes
    # old tmp trees and resets their modes, which would pull the cluster from under us.
    root = Path(tempfile.mkdtemp(prefix="jobd-test-pg-"))
    cluster = EmbeddedPostgres(root, fast=True)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_url(pg_cluster: EmbeddedPostgres | None) -> str:
    """URL of the session database `jobd_test` (or JOBD_TEST_DATABASE_URL as is)."""
    if pg_cluster is None:
        return os.environ[TEST_DATABASE_URL_ENV]
    return pg_cluster.create_database("jobd_test")


@contextmanager
def scratch_database(pg_cluster: EmbeddedPostgres | None, prefix: str = "jobd_t") -> Iterator[str]:
    """URL of a new, empty database `<prefix>_<uuid8>`, dropped (WITH FORCE) afterwards:
    on the session cluster, or on the server JOBD_TEST_DATABASE_URL names."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    if pg_cluster is not None:
        url = pg_cluster.create_database(name)
        try:
            yield url
        finally:
            pg_cluster.drop_database(name)
        return
    admin_url = os.environ[TEST_DATABASE_URL_ENV]
    _run_sql(admin_url, f"CREATE DATABASE {_quote_ident(name)}")
    try:
        yield _url_with_database(admin_url, name)
    finally:
        _run_sql(admin_url, f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")


@pytest.fixture
def fresh_database(pg_cluster: EmbeddedPostgres | None) -> Iterator[str]:
    """URL of a new, empty database for one test."""
    with scratch_database(pg_cluster) as url:
        yield url


# --------------------------------------------------------------------------- store, daemons


@pytest.fixture
async def store(fresh_database: str):
    """A migrated PgStore on a fresh database, inside this test's store loop (its own thread)."""

    async with bridge.open_loop():
        pg = PgStore(fresh_database, pool_min=1, pool_max=4, timeout_s=10)
        await pg.connect()
        try:
            yield pg
        finally:
            await pg.close()


@pytest.fixture
def sql(fresh_database: str):
    """Sync SQL on the fresh database, for assertions on what Postgres holds."""

    return Sql(fresh_database)


@pytest.fixture
def jobd(fresh_database: str, tmp_path):
    """Factory for real `jobd run` processes on the fresh database; all stopped at teardown."""

    started: list[JobdProcess] = []

    def start(**options) -> JobdProcess:
        proc = JobdProcess(tmp_path / f"d{len(started)}", fresh_database, **options)
        started.append(proc)
        proc.start()
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def empty_handlers() -> Iterator[Handlers]:
    """HANDLERS emptied for one test, which declares its kinds with @job; put back after
    (the daemon's default registry is module state, so a test never leaves kinds in it)."""
    saved = HANDLERS.registered()
    HANDLERS.restore({})
    yield HANDLERS
    HANDLERS.restore(saved)


@pytest.fixture
def cluster() -> Iterator[EmbeddedPostgres]:
    """A private cluster a test may stop and start (outages, restarts).

    Not under tmp_path: every pytest session that starts resets /tmp/pytest-of-<user> to
    0700, which (running as root) locks the server user out of a cluster below it until
    start() re-adds o+x; a concurrent run can do that between the two and fail the
    restart. tests/e2e/test_faults.py overrides it with a durable cluster."""
    root = Path(tempfile.mkdtemp(prefix="jobd-t-"))
    pg = EmbeddedPostgres(root / "pg", fast=True)
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
