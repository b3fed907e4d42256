"""Where the Postgres server programs come from, and the environment they run in.

Binaries come from, in order: ``$JOBD_PG_BINDIR``; ``pg_config --bindir``;
the highest ``/usr/lib/postgresql/*/bin``; the directory of ``initdb`` on PATH;
the ``pgserver`` wheel's bundled ``pginstall/bin`` (``pip install 'jobd[embedded]'``).
The wheel is found with ``importlib.util.find_spec``, never imported: it is an
optional dependency, and only its files are needed.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

BINDIR_ENV = "JOBD_PG_BINDIR"

MISSING_MSG = (
    "no Postgres server binaries found: install postgresql "
    "(Debian: apt-get install postgresql) or `pip install 'jobd[embedded]'`"
)


class EmbeddedPostgresError(Exception):
    """The embedded cluster could not be found, initialized, started or stopped."""


def has_server_binaries(d: Path) -> bool:
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
        if has_server_binaries(d):
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
        if out and has_server_binaries(Path(out)):
            return Path(out)
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")]
    for d in sorted(candidates, key=_version_key, reverse=True):
        if has_server_binaries(d):
            return d
    initdb = shutil.which("initdb")
    if initdb:
        d = Path(initdb).resolve().parent
        if has_server_binaries(d):
            return d
    return None


def find_bindir(
    sources: Sequence[Callable[[], Path | None]] | None = None,
) -> Path:
    """Directory holding initdb, pg_ctl and postgres.

    ``$JOBD_PG_BINDIR`` wins (and must be valid if set); then `sources` in order, by
    default the system's Postgres, then the pgserver wheel (a test passes none to see
    what a machine without Postgres gets). Raises EmbeddedPostgresError otherwise.
    """
    override = os.environ.get(BINDIR_ENV)
    if override:
        d = Path(override).expanduser()
        if not has_server_binaries(d):
            raise EmbeddedPostgresError(
                f"{BINDIR_ENV}={override} does not contain initdb, pg_ctl and postgres; "
                + MISSING_MSG
            )
        return d.resolve()
    for source in (_system_bindir, _pgserver_bindir) if sources is None else sources:
        found = source()
        if found is not None:
            return found
    raise EmbeddedPostgresError(MISSING_MSG)


# systemd's variables are jobd's, not the server's: a Postgres built with systemd support
# would otherwise send its own READY=1 on jobd's notify socket.
_SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                 "LISTEN_FDNAMES")


def clean_env() -> dict[str, str]:
    """The environment for the server programs: no PG* settings of ours, no systemd's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PG") and k not in _SYSTEMD_VARS}
    env["LC_ALL"] = "C"
    env.pop("LANGUAGE", None)
    return env
