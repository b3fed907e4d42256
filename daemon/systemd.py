"""The systemd notify protocol, spoken directly on $NOTIFY_SOCKET (no libsystemd).

One AF_UNIX datagram per message, `KEY=value` lines joined by newlines. Without
$NOTIFY_SOCKET every call is a no-op, so the daemon calls these unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import trio

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to the service manager; never raises on a send failure."""

    def __init__(self, address: str | None = None) -> None:
        # Abstract-namespace addresses are spelled with a leading "@" in the environment.
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        address = environ.get("NOTIFY_SOCKET") or None
        if address and not address.startswith(("/", "@")):
            # vsock: (systemd >= 254 inside VMs) and anything newer is not spoken here.
            log.warning(
                "unsupported NOTIFY_SOCKET address, not notifying systemd",
                extra={"event": "systemd.unsupported_socket", "address": address},
            )
            address = None
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram; returns whether it was sent."""
        if self._address is None or not lines:
            return False
        for line in lines:
            if "\n" in line:
                raise ValueError(f"notify line contains a newline: {line!r}")
        payload = "\n".join(lines).encode()
        # Non-blocking: the watchdog pings from the trio loop, which must never stall on
        # a full receive queue; a lost datagram is retried by the next tick.
        try:
            with socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            ) as sock:
                sock.sendto(payload, self._address)
        except OSError as exc:
            log.debug("systemd notify failed: %s", exc, extra={"event": "systemd.notify_failed"})
            return False
        return True

    def notify(self, **fields: object) -> bool:
        """`notify(READY=1, STATUS="ready")`; values are flattened to one line each."""
        return self.send(*(f"{key}={_one_line(value)}" for key, value in fields.items()))

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status), f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        return self.send(*_status(text))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status(status))

    def reloading(self) -> bool:
        # systemd >= 253 matches RELOADING=1 to the reload by this timestamp; older
        # versions ignore the field. Follow with ready() once the reload is done.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def watchdog_interval(self, environ: Mapping[str, str] = os.environ) -> float | None:
        """Seconds between pings (half of $WATCHDOG_USEC), or None when not watched."""
        if not self.enabled:
            return None
        pid = environ.get("WATCHDOG_PID")
        if pid and pid.strip() != str(os.getpid()):
            # The variable was inherited from a parent that systemd is watching, not us.
            return None
        try:
            usec = int(environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000


async def run_watchdog(notifier: Notifier, interval: float) -> None:
    """Ping forever from the trio loop: a blocked loop stops the pings, which is the point."""
    if interval <= 0:
        raise ValueError(f"watchdog interval must be positive, got {interval}")
    while True:
        notifier.watchdog()
        await trio.sleep(interval)


def _one_line(value: object) -> str:
    return " ".join(str(value).splitlines())


def _status(text: str | None) -> tuple[str, ...]:
    return () if text is None else (f"STATUS={_one_line(text)}",)
