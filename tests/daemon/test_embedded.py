from __future__ import annotations

import asyncio
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from daemon.embedded import EmbeddedPostgres, EmbeddedPostgresError, binaries, find_bindir
from daemon.embedded.pidfile import pid_alive

REPO = Path(__file__).resolve().parents[2]


def fetchval(url: str, sql: str):
    async def main():
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(main())


def execute(url: str, sql: str) -> None:
    async def main():
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(main())


def process_gone(pid: int) -> bool:
    # Our PID 1 may not reap: an exited-but-unreaped postmaster is a zombie; count it as gone.
    return not pid_alive(pid)


@pytest.fixture
def short_root():
    """A short path under /tmp, so the socket lives in <root>/pg/run."""
    d = Path(tempfile.mkdtemp(prefix="jpg"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cleanup():
    clusters: list[EmbeddedPostgres] = []
    yield clusters.append
    for c in clusters:
        c.stop()


def test_find_bindir_finds_server_binaries():
    d = find_bindir()
    for name in ("initdb", "pg_ctl", "postgres"):
        assert os.access(d / name, os.X_OK), d / name


def test_lifecycle_reuse_and_adopt(short_root, cleanup):
    pg = EmbeddedPostgres(short_root, fast=True)
    cleanup(pg)
    assert not pg.is_running() and pg.pid is None
    pg.stop()  # no-op when not running

    url = pg.start()
    assert url.startswith("postgresql://postgres@/postgres?host=")
    assert pg.start() == url  # idempotent
    assert fetchval(url, "SELECT current_setting('listen_addresses')") == ""
    assert fetchval(url, "SELECT current_setting('max_connections')") == "200"
    assert fetchval(url, "SELECT current_setting('fsync')") == "off"
    assert Path(fetchval(url, "SELECT current_setting('data_directory')")) == short_root / "pg/data"
    if os.geteuid() == 0:
        assert (short_root / "pg/data").stat().st_uid == pwd.getpwnam("nobody").pw_uid
        assert fetchval(url, "SELECT pg_backend_pid()")  # answered by a non-root server

    db_url = pg.create_database("keep")
    assert pg.create_database("keep") == db_url  # if not exists
    execute(db_url, "CREATE TABLE t (x int); INSERT INTO t VALUES (42)")

    pid = pg.pid
    assert pid is not None
    pg.stop()
    assert not pg.is_running() and pg.pid is None
    assert process_gone(pid)
    pg.stop()  # no-op

    # Restart reuses the data dir.
    url2 = pg.start()
    assert fetchval(pg.url("keep"), "SELECT x FROM t") == 42
    first_pid = pg.pid

    # A new owner (e.g. jobd restarted after being killed) adopts the running postmaster.
    log_before = (short_root / "pg/data/postgres.log").read_text()
    other = EmbeddedPostgres(short_root)
    assert other.start() == url2
    assert other.pid == first_pid
    assert (short_root / "pg/data/postgres.log").read_text() == log_before  # no new start
    assert fetchval(other.url("keep"), "SELECT x FROM t") == 42
    other.stop()
    assert not pg.is_running()
    assert process_gone(first_pid)


def test_durable_defaults(short_root, cleanup):
    pg = EmbeddedPostgres(short_root)
    cleanup(pg)
    url = pg.start()
    assert fetchval(url, "SELECT current_setting('fsync')") == "on"
    assert fetchval(url, "SELECT current_setting('synchronous_commit')") == "on"
    assert fetchval(url, "SELECT current_setting('full_page_writes')") == "on"


def test_long_root_uses_short_socket_dir(tmp_path, cleanup):
    root = tmp_path / ("long" * 20)
    pg = EmbeddedPostgres(root, fast=True)
    cleanup(pg)
    url = pg.start()
    sockdir = Path(pg._socket_dir)
    assert len(os.fsencode(str(sockdir / ".s.PGSQL.5432"))) < 100
    assert str(root) not in url
    assert fetchval(url, "SELECT 1") == 1
    # A new owner finds the socket dir through postmaster.pid.
    assert EmbeddedPostgres(root).start() == url
    pg.stop()
    assert not sockdir.exists()  # the temporary socket dir is cleaned up


def test_session_fixtures(pg_cluster, pg_url, fresh_database):
    # On the session cluster the database is jobd_test; JOBD_TEST_DATABASE_URL's is used as is.
    session = "jobd_test" if pg_cluster is not None else urlsplit(pg_url).path.lstrip("/")
    assert fetchval(pg_url, "SELECT current_database()") == session
    assert fetchval(fresh_database, "SELECT current_database()").startswith("jobd_t_")


def test_error_when_bindir_override_is_empty(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("JOBD_PG_BINDIR", str(empty))
    with pytest.raises(EmbeddedPostgresError, match="no Postgres server binaries found"):
        find_bindir()
    with pytest.raises(EmbeddedPostgresError, match="apt-get install postgresql"):
        EmbeddedPostgres(tmp_path / "root").start()
    monkeypatch.delenv("JOBD_PG_BINDIR")
    assert find_bindir()


def test_error_when_no_binaries_anywhere(tmp_path, monkeypatch):
    monkeypatch.delenv("JOBD_PG_BINDIR", raising=False)
    with pytest.raises(EmbeddedPostgresError) as ei:
        find_bindir(sources=())  # a machine with neither the system's Postgres nor the wheel
    assert str(ei.value) == (
        "no Postgres server binaries found: install postgresql "
        "(Debian: apt-get install postgresql) or `pip install 'jobd[embedded]'`"
    )
    with pytest.raises(EmbeddedPostgresError, match="jobd\\[embedded\\]"):
        EmbeddedPostgres(tmp_path, bindir=tmp_path).start()


def test_start_failure_reports_log_tail(short_root, cleanup):
    pg = EmbeddedPostgres(short_root, fast=True)
    cleanup(pg)
    pg.start()
    pg.stop()
    with open(short_root / "pg/data/postgresql.conf", "a") as f:
        f.write("\nshared_buffers = 'bogus'\n")
    with pytest.raises(EmbeddedPostgresError, match="shared_buffers") as ei:
        pg.start()
    assert "failed to start" in str(ei.value)
    assert not pg.is_running()


def _pgserver_bindir() -> Path | None:
    spec = importlib.util.find_spec("pgserver")
    if spec is None:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return d if (d / "initdb").exists() else None


@pytest.mark.skipif(_pgserver_bindir() is None, reason="pgserver wheel not installed")
def test_pgserver_binaries(short_root, cleanup):
    pg = EmbeddedPostgres(short_root, fast=True, bindir=_pgserver_bindir())
    cleanup(pg)
    url = pg.start()
    assert "PostgreSQL 16" in fetchval(url, "SELECT version()")
    # Reopening the cluster with other (older) binaries fails clearly, not obscurely.
    system = binaries._system_bindir()
    if system is not None and "16" not in str(system):
        pg.stop()
        with pytest.raises(EmbeddedPostgresError, match="was created by PostgreSQL 16"):
            EmbeddedPostgres(short_root, bindir=system).start()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
def test_runs_as_normal_user():
    """The euid != 0 path: binaries run directly as the calling (unprivileged) user."""
    nobody = pwd.getpwnam("nobody")
    root = Path(tempfile.mkdtemp(prefix="jpgu"))
    os.chmod(root, 0o755)
    os.chown(root, nobody.pw_uid, nobody.pw_gid)
    script = textwrap.dedent(
        f"""
        import asyncio, os, asyncpg
        from pathlib import Path
        from daemon.embedded import EmbeddedPostgres
        assert os.geteuid() != 0
        pg = EmbeddedPostgres(Path({str(root)!r}), fast=True)
        url = pg.start()
        async def q():
            c = await asyncpg.connect(url)
            v = await c.fetchval("SELECT current_user")
            await c.close()
            return v
        assert asyncio.run(q()) == "postgres"
        pg.stop()
        assert not pg.is_running()
        print("ok", url)
        """
    )
    try:
        proc = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             sys.executable, "-c", script],
            cwd=REPO, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO), "HOME": str(root)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr + proc.stdout
        assert proc.stdout.startswith("ok")
    finally:
        shutil.rmtree(root, ignore_errors=True)
