"""The only place asyncpg and trio-asyncio meet.

asyncpg is asyncio-only; jobd runs one asyncio loop inside trio (`open_loop`) and
crosses it once per store call. Each crossing costs tens of microseconds, which is
why store methods take batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import trio_asyncio

from actors.ports import Conflict, StoreUnavailable, ValueRejected

T = TypeVar("T")

open_loop = trio_asyncio.open_loop

# Errors that mean "the database is not there right now", as opposed to a bad query.
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)


async def call(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run an asyncio coroutine function from trio, translating outages."""
    try:
        return await trio_asyncio.aio_as_trio(fn)(*args)
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"database unavailable: {exc.__class__.__name__}: {exc}") from exc
    except (asyncpg.exceptions.DeadlockDetectedError,
            asyncpg.exceptions.SerializationError) as exc:
        raise Conflict(f"retry: {exc}") from exc
    except asyncpg.DataError as exc:
        # The client's mistake, not a server error: every surface answers bad_request.
        raise ValueRejected(f"bad value: {exc}") from exc


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, _UNAVAILABLE)


async def _no_reset(connection: asyncpg.Connection) -> None:
    # jobd never leaves session state behind on pooled connections (LISTEN and
    # advisory locks use dedicated ones), so skip asyncpg's per-release RESET round trip.
    return None


async def create_pool(url: str, min_size: int, max_size: int, timeout_s: float,
                      synchronous_commit: bool = True) -> asyncpg.Pool:
    return await call(_create_pool, url, min_size, max_size, timeout_s, synchronous_commit)


async def _create_pool(url: str, min_size: int, max_size: int, timeout_s: float,
                       synchronous_commit: bool) -> asyncpg.Pool:
    settings = {"application_name": "jobd"}
    if not synchronous_commit:
        settings["synchronous_commit"] = "off"
    return await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        reset=_no_reset,
        command_timeout=timeout_s,
        timeout=timeout_s,
        server_settings=settings,
    )


async def connect(url: str, timeout_s: float) -> asyncpg.Connection:
    return await call(_connect, url, timeout_s)


async def _connect(url: str, timeout_s: float) -> asyncpg.Connection:
    return await asyncpg.connect(
        url,
        timeout=timeout_s,
        command_timeout=timeout_s,
        server_settings={"application_name": "jobd"},
    )
