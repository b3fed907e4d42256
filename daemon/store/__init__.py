"""PgStore: jobd's only door to Postgres. One thin method per named statement."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
import trio

from actors.ports import (
    Claimed,
    Conflict,
    Enqueued,
    NewJob,
    NullObserver,
    Observer,
    Outcome,
    ProgressUpdate,
    StoreUnavailable,
    Swept,
)
from daemon.store import bridge, migrate
from daemon.store import queries as q
from daemon.store.schedules import ScheduleStatements
from daemon.store.workflows import WorkflowStatements
from protocol.commands import Filtered

log = logging.getLogger("jobd.store")

# A store call waiting this long (or the database timeout, if shorter) makes the store
# unhealthy (not-ready) while it waits. Only the daemon's own short, frequent statements
# are watched: a bulk command over a big table may rightly take longer.
_HUNG_AFTER_S = 5.0
_WATCHED = frozenset({"heartbeat", "claim", "next_due", "finish", "progress", "ping"})


class LeaseLost(Exception):
    """A transactional finish matched no row: this attempt was rescued or cancelled."""


class PgStore(ScheduleStatements, WorkflowStatements):
    def __init__(self, url: str, *, pool_min: int = 2, pool_max: int = 10, timeout_s: float = 30.0):
        self.url = url
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._timeout_s = timeout_s
        self._pool: bridge.Pool | None = None
        self._healthy = False
        # Calls in flight, by a serial number: their start times (time.monotonic()).
        self._inflight: dict[int, float] = {}
        self._serial = 0
        # time.monotonic() of the last call that found the database unavailable, and of
        # the last heartbeat that renewed this daemon's leases (the reaper's rescue hold).
        self.unavailable_at: float | None = None
        self.renewed_at: float | None = None
        self.schema_version = 0
        self.observer: Observer = NullObserver()

    # -- life -------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """The last call answered, and none has been waiting on the database for long:
        a hung server (accepting, answering nothing) is not-ready before any call times
        out."""
        if not self._healthy:
            return False
        if self._inflight:
            oldest = min(self._inflight.values())
            if time.monotonic() - oldest > min(_HUNG_AFTER_S, self._timeout_s):
                return False
        return True

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self._healthy = value

    async def connect(self) -> None:
        """Open the pool and apply migrations; raises StoreUnavailable while the DB is down."""
        if self._pool is None:
            self._pool = bridge.Pool(self.url, max_size=self._pool_max, timeout_s=self._timeout_s)
        await self._pool.open(self._pool_min)
        await self._migrate()
        self.healthy = True

    async def _migrate(self) -> None:
        # A dedicated connection: the advisory lock is session-scoped.
        async def apply(connection: asyncpg.Connection) -> int:
            await migrate.apply(connection)
            return await migrate.current_version(connection)

        connection = await bridge.connect(self.url, self._timeout_s)
        try:
            self.schema_version = await bridge.call(apply, connection)
        finally:
            connection.terminate()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _run(self, fn: Callable[..., Any], *args: Any, op: str = "other") -> Any:
        """Run `fn(connection, *args)` on the asyncio side; track health (/readyz) and timing."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable("store is not connected")
        started = time.perf_counter()
        self._serial += 1
        serial = self._serial
        if op in _WATCHED:
            self._inflight[serial] = time.monotonic()
        try:
            try:
                async with pool.connection() as connection:
                    result = await bridge.call(fn, connection, *args)
            except bridge.StaleConnection:
                # An idle connection the server had closed (a restart, a terminated
                # backend); nothing was sent, so run it once more on a fresh one.
                async with pool.connection(fresh=True) as connection:
                    result = await bridge.call(fn, connection, *args)
        except Conflict:
            raise  # the database answered; the caller retries
        except StoreUnavailable:
            self.healthy = False
            self.unavailable_at = time.monotonic()
            raise
        finally:
            self._inflight.pop(serial, None)
        self.observer.db_round_trip(op, time.perf_counter() - started)
        self.healthy = True
        return result

    async def _fetch(self, sql: str, *args: Any, op: str = "other") -> list[asyncpg.Record]:
        return await self._run(_fetch, sql, *args, op=op)

    async def _execute(self, sql: str, *args: Any, op: str = "other") -> str:
        return await self._run(_execute, sql, *args, op=op)

    async def ping(self) -> None:
        await self._run(_fetchval, "SELECT 1", op="ping")

    async def migrations_current(self) -> bool:
        return self.schema_version >= migrate.latest_version()

    # -- daemons ----------------------------------------------------------------

    async def register_daemon(
        self, daemon_id: str, region: str, host: str, pid: int, version: str
    ) -> None:
        await self._execute(q.REGISTER_DAEMON, daemon_id, region, host, pid, version)

    async def heartbeat(
        self,
        daemon_id: str,
        lease_s: float,
        status: str,
        draining: bool,
        now: datetime | None = None,
        running: list[tuple[int, int]] | None = None,
    ) -> list[tuple[int, int]]:
        """Renew this daemon's leases; `running` (job id, lease token) limits it to the
        attempts still alive here (None renews every job the daemon owns). Returns the
        attempts of `running` whose lease could not be renewed: they lost it."""
        pairs = sorted(running) if running is not None else None
        rows = await self._fetch(
            q.HEARTBEAT, daemon_id, lease_s, status, draining, now,
            [p[0] for p in pairs] if pairs is not None else None,
            [p[1] for p in pairs] if pairs is not None else None, op="heartbeat",
        )
        self.renewed_at = time.monotonic()
        return [(r["id"], r["token"]) for r in rows]

    async def set_daemon_queues(self, daemon_id: str, queues: list[str]) -> None:
        await self._execute(q.SET_DAEMON_QUEUES, daemon_id, sorted(queues))

    async def live_queues(self, live_s: float) -> list[str]:
        """Queues served by daemons whose heartbeat is younger than `live_s`."""
        return [r["queue"] for r in await self._fetch(q.LIVE_QUEUES, live_s)]

    async def put_settings(self, settings: dict[str, Any]) -> None:
        """Limits for jobd.enqueue (SQL), e.g. {"max_args_bytes": 1048576}."""
        await self._execute(q.PUT_SETTINGS, msgspec.json.encode(settings).decode())

    async def deregister_daemon(self, daemon_id: str) -> None:
        await self._execute(q.DEREGISTER_DAEMON, daemon_id)

    async def list_daemons(self) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._fetch(q.LIST_DAEMONS)]

    async def forget_dead_daemons(self, after_s: float, now: datetime | None = None) -> int:
        tag = await self._execute(q.FORGET_DEAD_DAEMONS, after_s, now)
        return int(tag.split()[-1])

    # -- jobs -------------------------------------------------------------------

    async def enqueue_many(self, jobs: list[NewJob]) -> list[Enqueued]:
        if not jobs:
            return []
        rows = await self._fetch(q.ENQUEUE_MANY, q.job_rows_json(jobs), op="enqueue")
        out = []
        for job, row in zip(jobs, rows, strict=True):
            job_id = row["id"]
            if job_id is None:
                # The unique-key holder was inserted by a transaction that committed
                # after our snapshot; it is visible now.
                job_id = await self._run(_fetchval, q.FIND_UNFINISHED_BY_UNIQUE_KEY, job.unique_key)
            out.append(Enqueued(id=job_id, created=row["created"]))
        return out

    async def claim(
        self,
        queue: str,
        limit: int,
        owner: str,
        lease_s: float,
        kinds: list[str],
        now: datetime | None = None,
        paused_keys: list[str] | None = None,
        limits: dict[str, Any] | None = None,
    ) -> list[Claimed]:
        """Under flow control (`limits`), jobd.claim_flow applies every key limit."""
        if limits is None:
            rows = await self._fetch(
                q.CLAIM, queue, limit, owner, lease_s, now, kinds, paused_keys or [], op="claim",
            )
        else:
            rows = await self._fetch(
                q.CLAIM_FLOW, queue, limit, owner, lease_s, now, kinds, paused_keys or [],
                msgspec.json.encode(limits).decode(), op="claim",
            )
        return [Claimed(*r) for r in rows]  # columns in field order (CLAIMED_COLUMNS)

    async def next_due(
        self, queue: str, kinds: list[str], paused_keys: list[str] | None = None
    ) -> float | None:
        return await self._run(
            _fetchval, q.NEXT_DUE, queue, kinds, paused_keys or [], op="next_due"
        )

    async def finish_many(
        self, outcomes: list[Outcome],
        key_failures: Callable[[str, str, int], None] | None = None,
    ) -> set[int]:
        """Returns the ids actually finished; `key_failures(queue, key, n)` hears each key's
        consecutive-failure count after the batch (for breaker metrics)."""
        if not outcomes:
            return set()
        # In id order, as the heartbeat locks them: two statements never wait on each other crosswise.
        outcomes = sorted(outcomes, key=lambda o: o.id)
        rows = await self._fetch(q.FINISH_MANY, *_outcome_columns(outcomes), op="finish")
        if key_failures is not None:
            for r in rows:
                if r["key"] is not None:
                    queue, _, key = r["key"].partition(":")
                    key_failures(queue, key, r["failures"])
        return {r["id"] for r in rows if r["id"] is not None}

    async def write_progress(self, updates: list[ProgressUpdate], lease_s: float) -> None:
        if updates:
            await self._execute(
                q.WRITE_PROGRESS,
                [u.id for u in updates],
                [u.token for u in updates],
                [u.pct for u in updates],
                [u.note for u in updates],
                lease_s,
                op="progress",
            )

    async def cancel(self, job_id: int) -> tuple[str, str] | None:
        rows = await self._fetch(q.CANCEL, job_id)
        return (rows[0]["was"], rows[0]["now"]) if rows else None

    async def running_cancel_requests(self, daemon_id: str) -> list[int]:
        return [r["id"] for r in await self._fetch(q.RUNNING_CANCEL_REQUESTS, daemon_id)]

    async def get_job(self, job_id: int) -> dict[str, Any] | None:
        rows = await self._fetch(q.GET_JOB, job_id)
        return dict(rows[0]) if rows else None

    async def stats(self) -> list[tuple[str, str, int]]:
        return [(r["queue"], r["state"], r["n"]) for r in await self._fetch(q.STATS)]

    # -- the control plane ----------------------------------------------------------

    async def list_jobs(
        self, where: Filtered, cursor: int | None, limit: int, field_bytes: int = 4096
    ) -> list[dict[str, Any]]:
        """A page; args/result/errors over `field_bytes` are left out, named in `truncated`."""
        rows = await self._fetch(q.LIST_JOBS, *where.filter_values(), cursor, limit,
                                 field_bytes, op="list")
        return [dict(r) for r in rows]

    async def summarize(self, where: Filtered) -> dict[str, int]:
        rows = await self._fetch(q.SUMMARIZE_JOBS, *where.filter_values(), op="summary")
        return {r["state"]: r["n"] for r in rows}

    async def cancel_matching(self, where: Filtered, dry_run: bool) -> tuple[int, int]:
        return await self._bulk(q.CANCEL_MATCHING, where, dry_run)

    async def retry_matching(self, where: Filtered, dry_run: bool) -> tuple[int, int]:
        return await self._bulk(q.RETRY_MATCHING, where, dry_run)

    async def delete_matching(self, where: Filtered, dry_run: bool) -> tuple[int, int]:
        return await self._bulk(q.DELETE_MATCHING, where, dry_run)

    async def _bulk(self, sql: str, where: Filtered, dry_run: bool) -> tuple[int, int]:
        row = (await self._fetch(sql, *where.filter_values(), dry_run, op="bulk"))[0]
        return row["matched"], row["changed"]

    async def replay_matching(self, where: Filtered, dry_run: bool) -> tuple[int, list[int]]:
        row = (await self._fetch(q.REPLAY_MATCHING, *where.filter_values(), dry_run, op="bulk"))[0]
        return row["matched"], list(row["ids"])

    async def key_stats(self, queue: str | None, limit: int = 50) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._fetch(q.KEY_STATS, queue, limit, op="stats")]

    async def age_priorities(
        self, queue: str, aging_s: float, floor: int, limit: int, now: datetime | None = None
    ) -> int:
        tag = await self._execute(q.AGE_PRIORITIES, queue, aging_s, floor, now, limit, op="aging")
        return int(tag.split()[-1])

    async def pause(self, queue: str, key: str | None) -> None:
        await self._execute(q.PAUSE, queue, key, op="pause")

    async def resume(self, queue: str, key: str | None) -> None:
        await self._execute(q.RESUME, queue, key, op="pause")

    async def list_pauses(self) -> list[tuple[str, str]]:
        return [(r["queue"], r["key"]) for r in await self._fetch(q.LIST_PAUSES, op="pause")]

    # -- maintenance --------------------------------------------------------------

    async def rescue_expired(self, limit: int, now: datetime | None = None) -> list[Swept]:
        rows = await self._fetch(q.RESCUE_EXPIRED, limit, now, op="rescue")
        return [Swept(**dict(r)) for r in rows]

    async def expire_overdue(
        self, limit: int, grace_s: float, now: datetime | None = None
    ) -> list[Swept]:
        rows = await self._fetch(q.EXPIRE_OVERDUE, limit, grace_s, now, op="expire")
        return [Swept(**dict(r)) for r in rows]

    async def promote_due(self, limit: int, now: datetime | None = None) -> int:
        return int((await self._execute(q.PROMOTE_DUE, limit, now)).split()[-1])

    async def prune_finished(
        self,
        state: str,
        max_age_s: float,
        max_count: int,
        limit: int,
        now: datetime | None = None,
    ) -> int:
        tag = await self._execute(
            q.PRUNE_FINISHED, state, max_age_s, max_count, limit, now, op="prune"
        )
        return int(tag.split()[-1])

    async def prune_idle_keys(
        self, limit: int, idle_s: float, forget_s: float, now: datetime | None = None
    ) -> int:
        """Delete up to `limit` flow-key rows in their default state whose key has nothing
        available or running and was idle for `idle_s` (queries.PRUNE_IDLE_KEYS)."""
        tag = await self._execute(q.PRUNE_IDLE_KEYS, limit, idle_s, now, forget_s, op="prune")
        return int(tag.split()[-1])

    # -- metrics ------------------------------------------------------------------

    @asynccontextmanager
    async def metrics_session(self) -> AsyncIterator[MetricsSession]:
        """A dedicated connection for the queue gauges; closing it drops the leader lock."""
        connection = await bridge.connect(self.url, self._timeout_s)
        try:
            yield MetricsSession(connection, self.observer)
        finally:
            if not connection.is_closed():
                connection.terminate()

    # -- handler transactions and notifications ------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[HandlerTransaction]:
        if self._pool is None:
            raise StoreUnavailable("store is not connected")
        async with self._transaction_connection() as (connection, tx):
            try:
                yield HandlerTransaction(connection)
            except BaseException:
                # Bounded: against a hung server the rollback would wait for the command
                # timeout. If it fails the pool drops the connection (still in a
                # transaction), and the server rolls back when it sees it gone.
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        await bridge.call(tx.rollback)
                    except StoreUnavailable:
                        pass
                raise
            else:
                await bridge.call(tx.commit)

    @asynccontextmanager
    async def _transaction_connection(self) -> AsyncIterator[tuple[asyncpg.Connection, Any]]:
        assert self._pool is not None
        for fresh in (False, True):
            async with self._pool.connection(fresh=fresh) as connection:
                tx = connection.transaction()
                try:
                    await bridge.call(tx.start)
                except bridge.StaleConnection:
                    if fresh:
                        raise
                    continue  # nothing was sent: begin again on a fresh connection
                yield connection, tx
                return

    @asynccontextmanager
    async def listen(
        self, channels: list[str], send: trio.MemorySendChannel[tuple[str, str]],
        on_full: Callable[[str, str], None],
    ) -> AsyncIterator[None]:
        """Keep a dedicated LISTEN connection alive while the block runs, putting each
        notification on `send` as (channel, payload); one that finds `send` full is
        lost and reported to `on_full(channel, payload)`.

        After every (re)connect each channel gets an empty notification, because
        anything sent while we were away was lost and waiters must re-check.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen_forever, channels, send, on_full)
            yield
            nursery.cancel_scope.cancel()

    async def _listen_forever(
        self, channels: list[str], send: trio.MemorySendChannel[tuple[str, str]],
        on_full: Callable[[str, str], None],
    ) -> None:
        def on_notify(_c: Any, _pid: int, channel: str, payload: str) -> None:
            # asyncio's callback: nothing here but the hand-over to the trio side.
            try:
                send.send_nowait((channel, payload))
            except trio.WouldBlock:
                on_full(channel, payload)

        backoff = 0.1
        while True:
            lost = trio.Event()
            connection = None
            try:
                connection = await bridge.connect(self.url, self._timeout_s)
                connection.add_termination_listener(lambda _c, lost=lost: lost.set())
                for channel in channels:
                    await bridge.call(connection.add_listener, channel, on_notify)
                backoff = 0.1
                for channel in channels:
                    await send.send((channel, ""))
                while not lost.is_set():
                    # A half-open TCP connection never terminates by itself; probe it.
                    with trio.move_on_after(15):
                        await lost.wait()
                    if not lost.is_set():
                        await bridge.call(connection.fetchval, "SELECT 1")
            except StoreUnavailable as exc:
                log.warning("LISTEN connection lost: %s", exc, extra={"event": "store.listen_lost"})
            except Exception:  # noqa: BLE001 - a listener that dies would stop every wake-up
                log.exception("LISTEN connection failed; reconnecting",
                              extra={"event": "store.listen_lost"})
            finally:
                if connection is not None and not connection.is_closed():
                    connection.terminate()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


class HandlerTransaction:
    """One connection in one transaction; see actors.ports.Transaction."""

    def __init__(self, connection: asyncpg.Connection):
        self._connection = connection

    async def execute(self, sql: str, *args: Any) -> str:
        return await bridge.call(self._connection.execute, sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return await bridge.call(self._connection.fetch, sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return await bridge.call(self._connection.fetchrow, sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await bridge.call(self._connection.fetchval, sql, *args)

    async def finish(self, outcome: Outcome) -> bool:
        rows = await bridge.call(
            self._connection.fetch, q.FINISH_MANY, *_outcome_columns([outcome])
        )
        if not any(r["id"] is not None for r in rows):
            raise LeaseLost(f"job {outcome.id}: this attempt no longer holds the lease")
        return True


class MetricsSession:
    """Leader election and the gauge queries, on one connection that holds the lock."""

    def __init__(self, connection: asyncpg.Connection, observer: Observer):
        self._connection = connection
        self._observer = observer

    async def try_lead(self) -> bool:
        """Take the session-level leader lock if free; call once per session until True."""
        return bool(await bridge.call(self._connection.fetchval, q.TRY_METRICS_LEADER,
                                      q.METRICS_LEADER_LOCK))

    async def queue_gauges(
        self, now: datetime | None = None
    ) -> tuple[list[tuple[str, str, int]], list[tuple[str, float]]]:
        """(queue, state, count) rows and (queue, oldest claimable age in seconds) rows."""
        started = time.perf_counter()
        counts = await bridge.call(self._connection.fetch, q.QUEUE_COUNTS)
        oldest = await bridge.call(self._connection.fetch, q.QUEUE_OLDEST_AVAILABLE, now)
        self._observer.db_round_trip("queue_gauges", time.perf_counter() - started)
        return ([(r["queue"], r["state"], r["n"]) for r in counts],
                [(r["queue"], r["age_s"]) for r in oldest])

    async def key_gauges(self, limit: int) -> list[dict[str, Any]]:
        """The busiest flow keys (KEY_STATS), for the per-key gauges."""
        rows = await bridge.call(self._connection.fetch, q.KEY_STATS, None, limit)
        return [dict(r) for r in rows]


def _outcome_columns(outcomes: list[Outcome]) -> tuple[list[Any], ...]:
    return (
        [o.id for o in outcomes],
        [o.token for o in outcomes],
        [o.state for o in outcomes],
        [o.result for o in outcomes],
        [o.delay_s for o in outcomes],
        [o.error for o in outcomes],
        [o.refund for o in outcomes],
        [o.flow for o in outcomes],
        [o.pause_s for o in outcomes],
    )


async def _fetch(connection: asyncpg.Connection, sql: str, *args: Any) -> list[asyncpg.Record]:
    return await connection.fetch(sql, *args)


async def _execute(connection: asyncpg.Connection, sql: str, *args: Any) -> str:
    return await connection.execute(sql, *args)


async def _fetchval(connection: asyncpg.Connection, sql: str, *args: Any) -> Any:
    return await connection.fetchval(sql, *args)
