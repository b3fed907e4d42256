"""The cluster's lifecycle: initdb once, start (or adopt a running postmaster), create
databases, stop. Each start and stop holds an flock on ``<root>/pg/.lock``, so two
processes sharing a state directory never race one pg_ctl against another.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from daemon.embedded.binaries import (
    BINDIR_ENV,
    MISSING_MSG,
    EmbeddedPostgresError,
    clean_env,
    find_bindir,
    has_server_binaries,
)
from daemon.embedded.pidfile import DEFAULT_PORT, PidFile, is_postgres_process, pid_alive
from daemon.embedded.privileges import ServerUser

log = logging.getLogger("daemon.embedded")

SUPERUSER = "postgres"
START_TIMEOUT = 60
# sun_path is 108 bytes including the NUL; keep a margin.
_SOCKET_PATH_LIMIT = 100
_SOCKET_NAME = ".s.PGSQL.{port}"
_TMP_SOCKET_PREFIX = "jobd-pg-"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(could not read {path}: {e})"
    return "\n".join(text.splitlines()[-lines:])



class EmbeddedPostgres:
    """A private Postgres cluster living in ``root / "pg"``."""

    def __init__(self, root: Path, *, fast: bool = False, bindir: Path | None = None) -> None:
        self.root = Path(root).absolute()
        self.base = self.root / "pg"
        self.datadir = self.base / "data"
        self.logfile = self.datadir / "postgres.log"
        self.fast = fast
        self._bindir = Path(bindir) if bindir is not None else None
        self._socket_dir: str | None = None
        self._port = DEFAULT_PORT
        self._mutex = threading.Lock()
        self._user = ServerUser()

    # -- public API -------------------------------------------------------------

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_bindir()
        elif not has_server_binaries(self._bindir):
            raise EmbeddedPostgresError(
                f"{self._bindir} does not contain initdb, pg_ctl and postgres; " + MISSING_MSG
            )
        return self._bindir

    @property
    def pid(self) -> int | None:
        pf = PidFile.read(self.datadir / "postmaster.pid")
        return pf.pid if pf is not None and pf.live() else None

    def is_running(self) -> bool:
        return self.pid is not None

    def start(self) -> str:
        """Init if needed, then start (or adopt a running postmaster). Idempotent."""
        with self._mutex, self._flock():
            if self._adopt():
                return self.url()
            bindir = self.bindir
            self._user.prepare(self.base, self.datadir, bindir)
            if not (self.datadir / "PG_VERSION").exists():
                self._initdb()
            self._check_version()
            self._remove_stale_pidfile()
            sockdir = self._choose_socket_dir()
            opts = " ".join(shlex.quote(f"--{k}={v}") for k, v in self._settings(sockdir).items())
            t0 = time.monotonic()
            proc = self._run(
                "pg_ctl", "start", "-w", "-t", str(START_TIMEOUT), "-D", str(self.datadir),
                "-l", str(self.logfile), "-o", opts, check=False,
            )  # fmt: skip
            if proc.returncode != 0 or not self.is_running():
                self._cleanup_tmp_socket_dir(sockdir)
                raise EmbeddedPostgresError(
                    f"embedded Postgres failed to start (pg_ctl exit {proc.returncode}) "
                    f"in {self.datadir}:\n{proc.stdout.strip()}\n"
                    f"--- tail of {self.logfile} ---\n{_tail(self.logfile)}"
                )
            self._socket_dir, self._port = sockdir, DEFAULT_PORT
            log.info(
                "embedded Postgres started in %.2fs (pid %s, socket %s, bindir %s)",
                time.monotonic() - t0, self.pid, sockdir, bindir,
            )  # fmt: skip
            return self.url()

    def url(self, database: str = "postgres") -> str:
        # postmaster.pid is the truth (another owner may have restarted the cluster).
        pf = PidFile.read(self.datadir / "postmaster.pid")
        if pf is not None and pf.socket_dir:
            self._socket_dir, self._port = pf.socket_dir, pf.port
        elif self._socket_dir is None:
            raise EmbeddedPostgresError("embedded Postgres is not running; call start()")
        host = quote(self._socket_dir, safe="/")
        return f"postgresql://{SUPERUSER}@/{quote(database, safe='')}?host={host}&port={self._port}"

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name` unless it exists; returns its URL."""
        ident = '"' + name.replace('"', '""') + '"'
        lit = "'" + name.replace("'", "''") + "'"
        exists = self.query(f"SELECT 1 FROM pg_database WHERE datname = {lit}")
        if not exists.strip():
            try:
                self.query(f"CREATE DATABASE {ident}")
            except EmbeddedPostgresError as e:
                if "already exists" not in str(e):
                    raise
        return self.url(name)

    def drop_database(self, name: str) -> None:
        ident = '"' + name.replace('"', '""') + '"'
        self.query(f"DROP DATABASE IF EXISTS {ident} WITH (FORCE)")

    def query(self, sql: str, database: str = "postgres") -> str:
        """Run `sql` with psql from the bindir; returns unaligned, tuples-only output."""
        self.url()  # ensures socket dir/port are known (raises if not running)
        assert self._socket_dir is not None
        psql = self.bindir / "psql"
        if not os.access(psql, os.X_OK):
            psql = Path(shutil.which("psql") or psql)
        cmd = [
            str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", self._socket_dir, "-p", str(self._port), "-U", SUPERUSER, "-d", database,
            "-c", sql,
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=clean_env(), timeout=120
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise EmbeddedPostgresError(f"psql failed: {e}") from e
        if proc.returncode != 0:
            raise EmbeddedPostgresError(f"psql failed on {sql!r}: {proc.stderr.strip()}")
        return proc.stdout

    def stop(self) -> None:
        """Fast shutdown, waiting for the postmaster to exit. No-op if not running."""
        with self._mutex, self._flock():
            pid = self.pid
            pf = PidFile.read(self.datadir / "postmaster.pid")
            if pid is None:
                self._socket_dir = None
                return
            proc = self._run(
                "pg_ctl", "stop", "-m", "fast", "-w", "-t", str(START_TIMEOUT),
                "-D", str(self.datadir), check=False,
            )  # fmt: skip
            deadline = time.monotonic() + START_TIMEOUT
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if pid_alive(pid):
                raise EmbeddedPostgresError(
                    f"embedded Postgres (pid {pid}) did not stop: {proc.stdout.strip()}"
                )
            if pf is not None:
                self._cleanup_tmp_socket_dir(pf.socket_dir)
            self._socket_dir = None
            log.info("embedded Postgres stopped (pid %s)", pid)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedPostgres({str(self.root)!r}, fast={self.fast}, pid={self.pid})"

    # -- internals ----------------------------------------------------------------

    def _settings(self, sockdir: str) -> dict[str, str]:
        s = {
            "listen_addresses": "",
            "unix_socket_directories": sockdir,
            "port": str(DEFAULT_PORT),
            "max_connections": "200",
        }
        if self.fast:
            s.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        return s

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        self.base.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.base / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _run(self, prog: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        kw = self._user.subprocess_options()
        try:
            proc = subprocess.run(
                [str(self.bindir / prog), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=clean_env(),
                cwd=self.base,
                timeout=START_TIMEOUT + 30,
                **kw,
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise EmbeddedPostgresError(f"running {prog} failed: {e}") from e
        if check and proc.returncode != 0:
            raise EmbeddedPostgresError(
                f"{prog} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout.strip()}"
            )
        return proc

    def _initdb(self) -> None:
        # initdb into a scratch dir and rename, so an interrupted initdb never
        # leaves a half-built data dir behind.
        for old in self.base.glob("data.initdb-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp = self.base / f"data.initdb-{os.getpid()}"
        tmp.mkdir(mode=0o700)
        self._user.own(tmp, 0o700)
        args = ["-D", str(tmp), "-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "--no-locale"]
        if self.fast:
            args.append("--no-sync")
        t0 = time.monotonic()
        try:
            self._run("initdb", *args)
        except EmbeddedPostgresError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.datadir.exists():  # an empty leftover, e.g. created by hand
            self.datadir.rmdir()
        tmp.rename(self.datadir)
        log.info("embedded Postgres: initdb %s took %.2fs", self.datadir, time.monotonic() - t0)

    def _check_version(self) -> None:
        try:
            data_ver = (self.datadir / "PG_VERSION").read_text().strip()
        except OSError:
            return
        out = subprocess.run(
            [str(self.bindir / "postgres"), "--version"],
            capture_output=True, text=True, env=clean_env(),
        ).stdout  # fmt: skip
        m = re.search(r"(\d+)(?:\.\d+)?", out)
        if m and m.group(1) != data_ver.split(".")[0] and not data_ver.startswith(m.group(1)):
            raise EmbeddedPostgresError(
                f"data directory {self.datadir} was created by PostgreSQL {data_ver}, but the "
                f"binaries in {self.bindir} are {out.strip()}; set {BINDIR_ENV} to a "
                f"PostgreSQL {data_ver} bin directory, or remove {self.datadir} (data loss)"
            )

    def _remove_stale_pidfile(self) -> None:
        pidfile = self.datadir / "postmaster.pid"
        pf = PidFile.read(pidfile)
        # Postgres itself removes a stale lock whose pid is dead, but refuses when the
        # pid was reused by an unrelated process (common after a container restart).
        if pf is not None and pid_alive(pf.pid) and not is_postgres_process(pf.pid):
            log.warning("embedded Postgres: removing stale %s (pid %s reused)", pidfile, pf.pid)
            pidfile.unlink(missing_ok=True)

    def _adopt(self) -> bool:
        """Adopt a postmaster already running on our data dir. Waits out starting/stopping."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            pf = PidFile.read(self.datadir / "postmaster.pid")
            if pf is None or not pf.live():
                return False
            if pf.status == "ready" and pf.socket_dir:
                self._socket_dir, self._port = pf.socket_dir, pf.port
                try:
                    self.query("SELECT 1")
                except EmbeddedPostgresError:
                    pass
                else:
                    log.info(
                        "embedded Postgres: adopted running postmaster pid %s (socket %s)",
                        pf.pid, pf.socket_dir,
                    )  # fmt: skip
                    return True
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"a postmaster (pid {pf.pid}, status {pf.status or '?'}) is running on "
                    f"{self.datadir} but does not answer; stop it and retry.\n"
                    f"--- tail of {self.logfile} ---\n{_tail(self.logfile)}"
                )
            time.sleep(0.05)

    def _choose_socket_dir(self) -> str:
        run = self.base / "run"
        sock = os.fsencode(run / _SOCKET_NAME.format(port=DEFAULT_PORT))
        if len(sock) < _SOCKET_PATH_LIMIT:
            run.mkdir(exist_ok=True)
            self._user.own(run, 0o700)
            return str(run)
        d = tempfile.mkdtemp(prefix=_TMP_SOCKET_PREFIX)
        self._user.own(Path(d), 0o700)
        log.info("embedded Postgres: %s is too long for a socket path; using %s", run, d)
        return d

    def _cleanup_tmp_socket_dir(self, sockdir: str) -> None:
        p = Path(sockdir)
        if (
            p.name.startswith(_TMP_SOCKET_PREFIX)
            and p.parent == Path(tempfile.gettempdir())
            and p != self.base / "run"
        ):
            shutil.rmtree(p, ignore_errors=True)
