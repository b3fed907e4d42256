"""What the daemon does on a signal: SIGHUP reloads, SIGTERM and SIGINT stop (drain).

The receiver is opened before anything else starts, so a SIGTERM always drains, even
one that arrives while the database is still being reached.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import contextmanager
from typing import Any

import trio

log = logging.getLogger("jobd.app")

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextmanager
def receiver() -> Any:
    with trio.open_signal_receiver(*HANDLED) as signals:
        yield signals


async def handle(signals: AsyncIterator[int], nursery: trio.Nursery, *,
                 reload: Callable[[], Awaitable[None]], stop: trio.Event) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            # In its own task: a slow reload must not hold up a SIGTERM behind it.
            nursery.start_soon(reload)
        else:
            log.info("got %s", signal.Signals(signum).name, extra={"event": "daemon.signal"})
            stop.set()
