"""A private Postgres cluster for ``jobd run`` when no database is configured.

Layout under ``<root>/pg``::

    data/            PGDATA (owned by the server user, mode 0700)
    data/postgres.log  server log (written by pg_ctl -l)
    run/             Unix socket directory (when the path is short enough)
    .lock            flock taken while starting/stopping

Binaries come from, in order: ``$JOBD_PG_BINDIR``; ``pg_config --bindir``;
the highest ``/usr/lib/postgresql/*/bin``; the directory of ``initdb`` on PATH;
the ``pgserver`` wheel's bundled ``pginstall/bin`` (``pip install 'jobd[embedded]'``).

The server listens on a Unix socket only (``listen_addresses = ''``), so any
number of clusters can run side by side without fighting over TCP ports.

Running as root: initdb/pg_ctl/postgres refuse to run as root, so they are run
as the ``nobody`` account.  The data and socket directories are chowned to it,
and every ancestor directory of the cluster (and of the binaries) that is not
searchable by "others" gets the o+x bit ONLY (never read), e.g. ``/root``
(0700 -> 0701).  Each such change is logged at WARNING level.

A postmaster left running by a previous, killed jobd is adopted by ``start()``
(pg_ctl daemonizes it into its own session, so it survives its parent).

Everything here is synchronous (subprocess); call it from trio via
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.util
import logging
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError", "find_bindir"]

log = logging.getLogger(__name__)

BINDIR_ENV = "JOBD_PG_BINDIR"
SERVER_USER_WHEN_ROOT = "nobody"
SUPERUSER = "postgres"
DEFAULT_PORT = 5432
START_TIMEOUT = 60
# sun_path is 108 bytes including the NUL; keep a margin.
_SOCKET_PATH_LIMIT = 100
_SOCKET_NAME = ".s.PGSQL.{port}"
_TMP_SOCKET_PREFIX = "jobd-pg-"

_MISSING_MSG = (
    "no Postgres server binaries found: install postgresql "
    "(Debian: apt-get install postgresql) or `pip install 'jobd[embedded]'`"
)


class EmbeddedPostgresError(Exception):
    """The embedded cluster could not be found, initialized, started or stopped."""


# --------------------------------------------------------------------------- binaries


def _has_server_binaries(d: Path) -> bool:
    return all(os.access(d / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres"))


def _version_key(p: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<ver>/bin -> numeric version parts ("9.6" -> (9, 6))
    return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (-1,)


def _pgserver_bindir() -> Path | None:
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for r in roots:
        d = Path(r) / "pginstall" / "bin"
        if _has_server_binaries(d):
            return d
    return None


def _system_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_server_binaries(Path(out)):
            return Path(out)
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]
    for d in sorted(candidates, key=_version_key, reverse=True):
        if _has_server_binaries(d):
            return d
    initdb = shutil.which("initdb")
    if initdb:
        d = Path(initdb).resolve().parent
        if _has_server_binaries(d):
            return d
    return None


def find_bindir() -> Path:
    """Directory holding initdb, pg_ctl and postgres.

    ``$JOBD_PG_BINDIR`` wins (and must be valid if set); then the system's
    Postgres; then the pgserver wheel.  Raises EmbeddedPostgresError otherwise.
    """
    override = os.environ.get(BINDIR_ENV)
    if override:
        d = Path(override).expanduser()
        if not _has_server_binaries(d):
            raise EmbeddedPostgresError(
                f"{BINDIR_ENV}={override} does not contain initdb, pg_ctl and postgres; "
                + _MISSING_MSG
            )
        return d.resolve()
    d = _system_bindir() or _pgserver_bindir()
    if d is None:
        raise EmbeddedPostgresError(_MISSING_MSG)
    return d


# --------------------------------------------------------------------------- helpers


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # An unreaped zombie (e.g. our PID 1 does not reap) still answers kill(0).
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
        return st[st.rindex(")") + 2] not in "ZX"
    except (OSError, ValueError, IndexError):
        return True


def _is_postgres_process(pid: int) -> bool:
    """False if /proc says pid is something else (pid reuse after a reboot/container restart)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return True  # no /proc (or no access): trust kill(0)
    return comm in ("postgres", "postmaster")


def _ensure_others_search(path: Path) -> None:
    """Add o+x (search only, never read) to `path` and each ancestor lacking it."""
    for d in [path, *path.parents]:
        try:
            mode = d.stat().st_mode
        except OSError:
            continue
        if not mode & stat.S_IXOTH:
            log.warning(
                "embedded Postgres: adding o+x (search only) to %s so the server user "
                "can reach the cluster (mode %o -> %o)",
                d,
                stat.S_IMODE(mode),
                stat.S_IMODE(mode) | stat.S_IXOTH,
            )
            os.chmod(d, stat.S_IMODE(mode) | stat.S_IXOTH)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(could not read {path}: {e})"
    return "\n".join(text.splitlines()[-lines:])


# systemd's variables are jobd's, not the server's: a Postgres built with systemd support
# would otherwise send its own READY=1 on jobd's notify socket.
_SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                 "LISTEN_FDNAMES")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PG") and k not in _SYSTEMD_VARS}
    env["LC_ALL"] = "C"
    env.pop("LANGUAGE", None)
    return env


class _PidFile:
    """Parsed postmaster.pid: pid, datadir, start, port, socket dir, listen, shmem, status."""

    def __init__(self, lines: list[str]) -> None:
        self.pid = int(lines[0])
        self.port = int(lines[3]) if len(lines) > 3 and lines[3].strip() else DEFAULT_PORT
        self.socket_dir = lines[4].strip() if len(lines) > 4 else ""
        self.status = lines[7].strip() if len(lines) > 7 else ""

    @classmethod
    def read(cls, path: Path) -> _PidFile | None:
        try:
            lines = path.read_text().splitlines()
            return cls(lines) if lines else None
        except (OSError, ValueError):
            return None


# --------------------------------------------------------------------------- cluster


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
        if os.geteuid() == 0:
            pw = pwd.getpwnam(SERVER_USER_WHEN_ROOT)
            self._uid: int | None = pw.pw_uid
            self._gid: int | None = pw.pw_gid
        else:
            self._uid = self._gid = None

    # -- public API -------------------------------------------------------------

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_bindir()
        elif not _has_server_binaries(self._bindir):
            raise EmbeddedPostgresError(
                f"{self._bindir} does not contain initdb, pg_ctl and postgres; " + _MISSING_MSG
            )
        return self._bindir

    @property
    def pid(self) -> int | None:
        pf = _PidFile.read(self.datadir / "postmaster.pid")
        if pf is None or not _pid_alive(pf.pid) or not _is_postgres_process(pf.pid):
            return None
        return pf.pid

    def is_running(self) -> bool:
        return self.pid is not None

    def start(self) -> str:
        """Init if needed, then start (or adopt a running postmaster). Idempotent."""
        with self._mutex, self._flock():
            if self._adopt():
                return self.url()
            bindir = self.bindir
            self._prepare_dirs(bindir)
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
        pf = _PidFile.read(self.datadir / "postmaster.pid")
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
                cmd, capture_output=True, text=True, env=_clean_env(), timeout=120
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
            pf = _PidFile.read(self.datadir / "postmaster.pid")
            if pid is None:
                self._socket_dir = None
                return
            proc = self._run(
                "pg_ctl", "stop", "-m", "fast", "-w", "-t", str(START_TIMEOUT),
                "-D", str(self.datadir), check=False,
            )  # fmt: skip
            deadline = time.monotonic() + START_TIMEOUT
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _pid_alive(pid):
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
    def _flock(self):
        self.base.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.base / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _run(self, prog: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        kw: dict = {}
        if self._uid is not None:
            kw = {"user": self._uid, "group": self._gid, "extra_groups": []}
        try:
            proc = subprocess.run(
                [str(self.bindir / prog), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=_clean_env(),
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

    def _chown(self, path: Path, mode: int) -> None:
        if self._uid is not None:
            os.chown(path, self._uid, self._gid)
        os.chmod(path, mode)

    def _prepare_dirs(self, bindir: Path) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if self._uid is None:
            return
        # Running as root: the server user must be able to reach base and the binaries.
        _ensure_others_search(self.base)
        _ensure_others_search(bindir.parent)
        if self.datadir.exists() and self.datadir.stat().st_uid != self._uid:
            log.warning("embedded Postgres: chowning %s to %s", self.datadir, SERVER_USER_WHEN_ROOT)
            for dirpath, dirnames, filenames in os.walk(self.datadir):
                for n in [*dirnames, *filenames]:
                    os.lchown(os.path.join(dirpath, n), self._uid, self._gid)
            self._chown(self.datadir, 0o700)

    def _initdb(self) -> None:
        # initdb into a scratch dir and rename, so an interrupted initdb never
        # leaves a half-built data dir behind.
        for old in self.base.glob("data.initdb-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp = self.base / f"data.initdb-{os.getpid()}"
        tmp.mkdir(mode=0o700)
        self._chown(tmp, 0o700)
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
            capture_output=True, text=True, env=_clean_env(),
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
        pf = _PidFile.read(pidfile)
        # Postgres itself removes a stale lock whose pid is dead, but refuses when the
        # pid was reused by an unrelated process (common after a container restart).
        if pf is not None and _pid_alive(pf.pid) and not _is_postgres_process(pf.pid):
            log.warning("embedded Postgres: removing stale %s (pid %s reused)", pidfile, pf.pid)
            pidfile.unlink(missing_ok=True)

    def _adopt(self) -> bool:
        """Adopt a postmaster already running on our data dir. Waits out starting/stopping."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            pf = _PidFile.read(self.datadir / "postmaster.pid")
            if pf is None or not _pid_alive(pf.pid) or not _is_postgres_process(pf.pid):
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
            self._chown(run, 0o700)
            return str(run)
        d = tempfile.mkdtemp(prefix=_TMP_SOCKET_PREFIX)
        self._chown(Path(d), 0o700)
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
