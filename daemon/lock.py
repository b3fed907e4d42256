"""One daemon per state directory and per control socket: exclusive `flock`s held for
the process's life.

A second `jobd run` on the same state directory would adopt the first one's embedded
postmaster and socket, and on its way out stop that Postgres and unlink the socket,
leaving the first daemon running but unreachable. So before anything else happens
(before Postgres is started or adopted, before the socket path is touched) `jobd run`
takes `<state>/jobd.lock` and `<socket>.lock`, and a second daemon is refused.

The kernel drops a flock when its holder dies (even by SIGKILL), so a crashed daemon
never leaves a stale lock behind; the pid written into the file is only for the
message. The descriptors are close-on-exec, so the postmaster that pg_ctl forks never
inherits them (an orphaned postmaster must not keep the next daemon out).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["AlreadyRunning", "hold", "lock_paths"]

_held: list[int] = []  # the descriptors, open until the process exits


class AlreadyRunning(Exception):
    """Another live process holds the lock; the message is one line for the operator."""


def lock_paths(state: Path, socket: Path) -> list[tuple[str, Path, Path]]:
    """(what, the thing locked, its lock file) for each lock a daemon holds."""
    return [("state directory", state, state / "jobd.lock"),
            ("control socket", socket, socket.with_name(socket.name + ".lock"))]


def hold(state: Path, socket: Path) -> None:
    """Take every lock or none; AlreadyRunning names the holder and what it holds."""
    taken: list[int] = []
    try:
        for what, target, path in lock_paths(state, socket):
            taken.append(_take(f"{what} {target}", path))
    except BaseException:
        for fd in taken:
            os.close(fd)
        raise
    _held.extend(taken)


def release() -> None:
    """For tests that take the locks in-process; a daemon just exits."""
    while _held:
        os.close(_held.pop())


def _take(what: str, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f"pid {holder}" if holder else "another process"
        raise AlreadyRunning(f"another jobd ({who}) is running on {what} "
                             f"(lock {path}); refusing to start a second one") from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None
