"""Running the cluster when jobd runs as root.

initdb, pg_ctl and postgres refuse to run as root, so they are run as the ``nobody``
account. The data and socket directories are chowned to it, and every ancestor
directory of the cluster (and of the binaries) that is not searchable by "others" gets
the o+x bit ONLY (never read), e.g. ``/root`` (0700 -> 0701). Each such change is
logged at WARNING level. Not root: nothing changes hands and the programs run as us.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
from pathlib import Path
from typing import Any

log = logging.getLogger("daemon.embedded")

SERVER_USER_WHEN_ROOT = "nobody"


class ServerUser:
    """Who the server programs run as: `nobody` when we are root, else ourselves (ids None)."""

    def __init__(self) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam(SERVER_USER_WHEN_ROOT)
            self.uid: int | None = pw.pw_uid
            self.gid: int | None = pw.pw_gid
        else:
            self.uid = self.gid = None

    @property
    def switches(self) -> bool:
        return self.uid is not None

    def subprocess_options(self) -> dict[str, Any]:
        """subprocess.run keywords that drop to the server user (none when not root)."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def own(self, path: Path, mode: int) -> None:
        """`path` belongs to the server user, with `mode`."""
        if self.uid is not None:
            os.chown(path, self.uid, self.gid if self.gid is not None else -1)
        os.chmod(path, mode)

    def prepare(self, base: Path, datadir: Path, bindir: Path) -> None:
        """Make `base` (and the binaries) reachable, and an existing data dir ours."""
        base.mkdir(parents=True, exist_ok=True)
        if self.uid is None:
            return
        gid = self.gid if self.gid is not None else -1
        # Running as root: the server user must be able to reach base and the binaries.
        ensure_others_search(base)
        ensure_others_search(bindir.parent)
        if datadir.exists() and datadir.stat().st_uid != self.uid:
            log.warning("embedded Postgres: chowning %s to %s", datadir, SERVER_USER_WHEN_ROOT)
            for dirpath, dirnames, filenames in os.walk(datadir):
                for n in [*dirnames, *filenames]:
                    os.lchown(os.path.join(dirpath, n), self.uid, gid)
            self.own(datadir, 0o700)


def ensure_others_search(path: Path) -> None:
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
