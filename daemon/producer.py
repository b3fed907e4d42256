"""The direct producer: a Python application that shares jobd's database enqueues
straight into Postgres, so no daemon's loop is on its path.

    from daemon.producer import DirectProducer

    async with DirectProducer("postgresql://app@db/jobs", modules=["myapp.handlers"]) as jobs:
        done = await jobs.enqueue("listings.refresh", {"marketplace": "ebay"}, key="ebay")

        async with pool.acquire() as conn, conn.transaction():   # your own transaction
            await conn.execute("INSERT INTO orders ...")
            await jobs.enqueue("orders.confirm", {"order": 7}, connection=conn)
            # the job exists only if the order commits

What it shares with the socket path, so a job is the same row whichever way it came:
the request is decoded by the same command decoder (protocol/commands.py: ranges, NUL
bytes, unknown options), the row is built by the one job builder (actors/jobs.py:
the handler's defaults, its key and cost functions, the strict args check against its
Struct, the row checks of actors/validate.py) and written by the same statement
(daemon/store/jobs.enqueue_rows, whose trigger NOTIFYs the daemons). The
answers are the socket client's: `EnqueueResult`/`BatchResult` (a unique key already
held by an unfinished job gives its id with `created=False`, and a queue no live daemon
serves a `warning`), and the same `JobdError` codes: `invalid_args`, `bad_request`,
`too_large`, `bad_json`, `unknown_kind`, `unauthorized` (a role without rights on the
jobd schema) and `unavailable` (Postgres unreachable, or no jobd schema in it).

A kind's handler is known when its module is imported in this process (`modules=`, or
any `@job` registration already imported, in `actors.HANDLERS` or the `handlers=` you
pass). For a kind with no handler here the args get only the generic value checks and
the row takes jobd's defaults for what you leave unset (queue "default", priority 0,
3 attempts, no timeout, cost 1), as SQL `jobd.enqueue` does; the daemon checks the args
against the handler when the job runs. `require_handler=True` refuses such a kind with
`unknown_kind`, as the socket does.

asyncio only: asyncpg is asyncio-native (FastAPI, aiohttp, plain asyncio). From trio,
run it through the daemon's own bridge (an asyncio loop on a thread of its own):

    async with bridge.open_loop():          # daemon.store.bridge
        jobs = DirectProducer(url)
        await bridge.call(jobs.open)
        done = await bridge.call(jobs.enqueue, "noop", {})

Inside your transaction, a statement Postgres refuses aborts that transaction, as any
failed statement does; values are checked before anything is sent, so that takes a
value the checks here cannot see (a CHECK added by a newer migration). Use a savepoint
(a nested `conn.transaction()`) to carry on after one.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec

from actors import jobs
from actors.handlers import HANDLERS, Handlers
from actors.ports import Conflict, NewJob, StoreUnavailable, ValueRejected
from actors.services.group_commit import GroupCommit
from actors.services.live_queues import LiveSet, unserved_warning
from actors.validate import DEFAULT_MAX_ARGS_BYTES
from daemon.api.requests import decode
from daemon.store.bridge import StaleConnection, translate
from daemon.store.direct import Pool, live_queues, read_settings, tool_kinds
from daemon.store.jobs import enqueue_rows
from protocol import commands as c
from protocol.errors import BadRequest, ErrorCode, JobdError, Unavailable
from protocol.jobs import JobSpec

# What a kind no handler here declares takes: the column defaults jobd.enqueue uses.
NO_HANDLER = jobs.Defaults(queue="default", priority=0, max_attempts=3, timeout_s=None)
# The daemons publish their limits at start; a producer reads them again this often,
# so a restart with new [limits] reaches it without a restart of the application.
SETTINGS_TTL_S = 60.0
DEFAULT_LIVE_S = 60.0  # jobd.enqueue's default too, before any daemon has published one
APPLICATION_NAME = "jobd-producer"


class DirectProducer:
    """Enqueues into jobd's Postgres from asyncio; see the module docstring.

    `database`: a Postgres URL (the producer opens a small pool of its own and closes
    it in `close()`), or an asyncpg `Pool` or `Connection` of yours (used, never
    closed). Every call also takes `connection=`, one of your connections, to enqueue
    inside a transaction you hold on it.
    """

    def __init__(self, database: str | asyncpg.Pool | asyncpg.Connection, *,
                 handlers: Handlers | None = None, modules: Sequence[str] = (),
                 require_handler: bool = False, max_args_bytes: int | None = None,
                 timeout: float = 30.0, pool_size: int = 4):
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - the module's own failure, named
                raise BadRequest(f"cannot import handler module {name!r}: {exc!r}",
                                 details={"module": name}) from exc
        self._handlers = handlers if handlers is not None else HANDLERS
        self._foreign = None if require_handler else NO_HANDLER
        self._max_args_bytes = max_args_bytes
        self._timeout = timeout
        self._pool_size = pool_size
        self._url: str | None = None
        self._pool: Any = None
        self._connection: Any = None
        if isinstance(database, str):
            self._url = database
        elif isinstance(database, asyncpg.Pool):
            self._pool = database
        else:
            self._connection = database
        # (monotonic time read, max_args_bytes, live_s) and (time read, live queues).
        self._tool_kinds: frozenset[str] = frozenset()  # kinds in jobd.kind_tools
        self._settings: tuple[float, int, float] = (-math.inf, DEFAULT_MAX_ARGS_BYTES,
                                                    DEFAULT_LIVE_S)
        self._live = LiveSet()
        self._commit: GroupCommit[NewJob, Any] = GroupCommit(
            self._write_pooled, what="enqueue", unavailable=(Unavailable,))

    # -- life -------------------------------------------------------------------

    async def __aenter__(self) -> DirectProducer:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the pool of a producer given a URL (else nothing); `unavailable` if
        Postgres cannot be reached. The first enqueue opens it too."""
        if self._url is None or self._pool is not None:
            return
        pool = Pool(self._url, size=self._pool_size, timeout_s=self._timeout,
                    application_name=APPLICATION_NAME)
        try:
            await pool.open()
        except ValueError as exc:  # asyncpg's reading of the URL
            raise BadRequest(f"not a Postgres URL asyncpg can use: {exc}") from None
        except Exception as exc:
            raise self._error(exc) from exc
        self._pool = pool

    async def close(self) -> None:
        pool, owned = self._pool, self._url is not None
        if owned and pool is not None:
            self._pool = None
            await pool.close()

    # -- enqueueing -----------------------------------------------------------------

    async def enqueue(self, kind: str, args: Any = None, *, connection: Any = None,
                      **options: Any) -> c.EnqueueResult:
        """One job; the options are JobSpec's (queue, key, unique_key, priority, delay_s,
        run_at, max_attempts, tags, timeout_s, cost), as for `Client.enqueue`."""
        cmd = self._decode({"type": "enqueue",
                            "job": {"kind": kind, "args": args or {}, **options}})
        limit, _ = await self._limits(connection)
        row = jobs.from_spec(self._handlers, cmd.job, max_args_bytes=limit,
                             foreign=self._foreign)
        if connection is None and self._connection is None:
            # On the producer's pool: concurrent enqueues of this process (a web app's
            # requests) share one statement and one commit, as the daemon's do.
            done = await self._commit.submit(row)
        else:
            [done] = await self._write([row], connection)
        return c.EnqueueResult(id=done.id, created=done.created, outcome=done.outcome,
                               warning=await self._unserved([row], connection))

    async def enqueue_many(self, specs: Sequence[JobSpec | Mapping[str, Any]], *,
                           connection: Any = None) -> c.BatchResult:
        """Many jobs in one statement (at most 100,000), all or none: JobSpecs or dicts of
        their fields, as for `Client.enqueue_batch`. An error names the job's `index`."""
        cmd = self._decode({"type": "enqueue_batch", "jobs": list(specs)})
        limit, _ = await self._limits(connection)
        rows: list[NewJob] = []
        for i, spec in enumerate(cmd.jobs):
            try:
                rows.append(jobs.from_spec(self._handlers, spec, max_args_bytes=limit,
                                           foreign=self._foreign))
            except JobdError as exc:
                exc.details["index"] = i
                raise
        done = await self._write(rows, connection) if rows else []
        return c.BatchResult(ids=[d.id for d in done], created=sum(d.created for d in done),
                             warning=await self._unserved(rows, connection))

    # The socket client's name for it: a producer can stand in for a client.
    enqueue_batch = enqueue_many

    # -- the parts ----------------------------------------------------------------

    def _decode(self, request: dict[str, Any]) -> Any:
        """Through JSON and the daemon's own command decoder, so every option is checked
        (and every refusal worded) exactly as a socket request is."""
        try:
            data = msgspec.json.encode(request)
        except (TypeError, OverflowError, msgspec.EncodeError) as exc:
            raise BadRequest(f"cannot encode the job as JSON: {exc}") from None
        return decode(c.command_decoder, data)

    async def _write(self, rows: list[NewJob], connection: Any) -> list[Any]:
        if self._foreign is not None and self._tool_kinds:
            # A kind whose module this application has not imported: its rows still go
            # through its flow-control tools, with the keys its *_field settings name.
            rows = [msgspec.structs.replace(r, tool_keys={})
                    if r.tool_keys is None and r.kind in self._tool_kinds else r for r in rows]
        done: list[Any] = await self._run(enqueue_rows, rows, connection=connection)
        return done

    async def _write_pooled(self, rows: list[NewJob]) -> list[Any]:
        return await self._write(rows, None)

    async def _limits(self, connection: Any) -> tuple[int, float]:
        """(max_args_bytes, live_s): what the daemons published, re-read every minute."""
        at, limit, live_s = self._settings
        if time.monotonic() - at > SETTINGS_TTL_S:
            found = await self._run(read_settings, ["max_args_bytes", "daemon_live_s"],
                                    connection=connection)
            limit = int(found.get("max_args_bytes", DEFAULT_MAX_ARGS_BYTES))
            live_s = float(found.get("daemon_live_s", DEFAULT_LIVE_S))
            if self._foreign is not None:
                self._tool_kinds = await self._run(tool_kinds, connection=connection)
            self._settings = (time.monotonic(), limit, live_s)
        if self._max_args_bytes is not None:
            limit = self._max_args_bytes
        return limit, live_s

    async def _unserved(self, rows: list[NewJob], connection: Any) -> str | None:
        """The socket's warning for queues no live daemon serves, on the socket path's
        cache rule (actors/services/live_queues.py)."""
        wanted = {r.queue for r in rows}
        if self._live.stale(time.monotonic(), wanted):
            _, live_s = await self._limits(connection)
            queues = await self._run(live_queues, live_s, connection=connection)
            self._live.update(time.monotonic(), set(queues), wanted)
        live = self._live.queues
        missing = sorted(wanted - live)
        return unserved_warning(missing, live) if missing else None

    async def _run(self, fn: Any, *args: Any, connection: Any) -> Any:
        """`fn(connection, *args)` on the caller's connection, ours, or one of the pool's;
        errors become the socket path's codes."""
        try:
            conn = connection if connection is not None else self._connection
            if conn is not None:
                return await fn(conn, *args)
            if self._pool is None:
                await self.open()
            for last in (False, True):
                try:
                    async with self._pool.acquire(timeout=self._timeout) as conn:
                        return await fn(conn, *args)
                except Exception as exc:
                    # An idle connection the server had closed: nothing was sent, so
                    # once more on another (as the daemon's pool does).
                    if last or not isinstance(translate(exc), StaleConnection):
                        raise
        except JobdError:
            raise
        except Exception as exc:
            raise self._error(exc) from exc
        raise AssertionError("unreachable")  # the loop returns or raises

    def _error(self, exc: Exception) -> Exception:
        if isinstance(exc, asyncpg.UndefinedTableError | asyncpg.InvalidSchemaNameError):
            return Unavailable(f"no jobd schema in this database ({exc}): start a jobd "
                               "daemon on it once, which applies the migrations")
        if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError
                      | asyncpg.InsufficientPrivilegeError):
            return JobdError(f"Postgres refused this role: {exc}{self._where()}",
                             code=ErrorCode.UNAUTHORIZED)
        if isinstance(exc, asyncpg.InFailedSQLTransactionError):
            return BadRequest(f"the caller's transaction is aborted: {exc} (roll it back, or "
                              "enqueue inside a savepoint)")
        translated = translate(exc)
        if isinstance(translated, Conflict):
            # A deadlock, or a REPEATABLE READ / SERIALIZABLE caller whose snapshot
            # predates a concurrent job with the same unique key: the transaction is
            # aborted, and only running it again can see what the other one wrote.
            message = str(exc).replace("\n", " ")
            return JobdError(f"conflict with a concurrent transaction: retry the transaction "
                             f"({message})", code=ErrorCode.CONFLICT)
        if isinstance(translated, StoreUnavailable):  # retrying may succeed
            message = f"{translated}{self._where()}".replace("\n", " ")
            return Unavailable(message)
        if isinstance(translated, ValueRejected):
            return BadRequest(str(translated))
        return exc

    def _where(self) -> str:
        if self._url is None:
            return ""
        parts = urlsplit(self._url)  # host and port only: the URL may hold a password
        return f" (Postgres at {parts.hostname or 'localhost'}:{parts.port or 5432})"

