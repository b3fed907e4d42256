"""postmaster.pid, and whether the pid in it is still a postmaster.

A postmaster left running by a previous, killed jobd is adopted (pg_ctl daemonizes it
into its own session, so it survives its parent); after a reboot or a container
restart the pid in a stale file may belong to something else, which /proc tells.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_PORT = 5432


def pid_alive(pid: int) -> bool:
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


def is_postgres_process(pid: int) -> bool:
    """False if /proc says pid is something else (pid reuse after a reboot/container restart)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return True  # no /proc (or no access): trust kill(0)
    return comm in ("postgres", "postmaster")


class PidFile:
    """Parsed postmaster.pid: pid, datadir, start, port, socket dir, listen, shmem, status."""

    def __init__(self, lines: list[str]) -> None:
        self.pid = int(lines[0])
        self.port = int(lines[3]) if len(lines) > 3 and lines[3].strip() else DEFAULT_PORT
        self.socket_dir = lines[4].strip() if len(lines) > 4 else ""
        self.status = lines[7].strip() if len(lines) > 7 else ""

    @classmethod
    def read(cls, path: Path) -> PidFile | None:
        try:
            lines = path.read_text().splitlines()
            return cls(lines) if lines else None
        except (OSError, ValueError):
            return None

    def live(self) -> bool:
        """The pid is alive and is a postmaster (not a reused pid)."""
        return pid_alive(self.pid) and is_postgres_process(self.pid)
