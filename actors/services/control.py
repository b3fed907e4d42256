"""Turns a decoded protocol command into store calls and actor messages.

Transports (socket, HTTP) own framing and auth; this owns meaning. Domain problems
come back as `protocol.errors.JobdError` with a stable code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import trio

from actors.errors import InvalidArgs, UnknownKind
from actors.flow import BREAKER_COOLDOWN_S, FlowLimits
from actors.handlers import lookup
from actors.ports import (
    Enqueued,
    NewJob,
    NullObserver,
    Observer,
    Store,
    StoreUnavailable,
    ValueRejected,
)
from actors.services import schedule_commands
from actors.validate import check_new_job, has_nul
from actors.validate import max_args_bytes as validate_max_args_bytes
from actors.workflow import workflow_view
from protocol import commands as c
from protocol.errors import BadRequest, ErrorCode, JobdError, NotFound, Unavailable
from protocol.framing import PROTOCOL_VERSION
from protocol.jobs import (
    DELAY_MAX_S,
    AttemptError,
    DaemonView,
    JobSpec,
    JobView,
    KeyStats,
    QueueCounts,
)
from protocol.tree import TreeNode

MAX_BATCH = c.MAX_BATCH
LIVE_QUEUES_TTL_S = 5.0


class Control:
    def __init__(
        self,
        store: Store,
        *,
        server: str,
        pong: Callable[[], c.Pong],
        tree: Callable[[], TreeNode],
        running_here: Callable[[], dict[str, tuple[int, int]]],
        cancel_here: Callable[[int], Awaitable[None]],
        drain: Callable[[bool], Awaitable[c.DrainResult]] | None = None,
        reload: Callable[[], Awaitable[c.ReloadResult]] | None = None,
        pauses: Callable[[], set[tuple[str, str]]] | None = None,
        flow_limits: Callable[[str], FlowLimits | None] | None = None,
        observer: Observer | None = None,
        max_args_bytes: int | None = None,
        list_field_bytes: int = 4096,
        queues: Callable[[], set[str]] | None = None,
        declared: Callable[[], set[str]] | None = None,
        live_s: float = 60.0,
    ):
        """`queues()`: the queues this daemon serves; an enqueue elsewhere asks the store
        which queues live daemons serve (heartbeat younger than `live_s`). A pause is
        also allowed for the queues the config declares (`declared()`)."""
        self._store = store
        self._server = server
        self._pong = pong
        self._tree = tree
        self._running_here = running_here
        self._cancel_here = cancel_here
        self._drain = drain
        self._reload = reload
        self._pauses = pauses or set
        self._flow_limits = flow_limits or (lambda queue: None)
        self._observer: Observer = observer or NullObserver()
        self._max_args_bytes = max_args_bytes if max_args_bytes is not None else \
            validate_max_args_bytes()
        self._list_field_bytes = list_field_bytes
        self._queues = queues
        self._declared = declared or set
        self._live_s = live_s
        self._live_cache: tuple[float, set[str]] = (-float("inf"), set())

    async def handle(self, cmd: c.Command) -> Any:
        try:
            return await self._handle(cmd)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        except ValueRejected as exc:
            raise BadRequest(str(exc)) from exc

    async def _handle(self, cmd: c.Command) -> Any:
        match cmd:
            case c.Hello():
                return self.hello(cmd)
            case c.Ping():
                return self._pong()
            case c.Tree():
                return self._tree()
            case c.Enqueue():
                row = new_job(cmd.job, max_args_bytes=self._max_args_bytes)
                [done] = await self._store.enqueue_many([row])
                self._count_enqueued([row], [done])
                return c.EnqueueResult(id=done.id, created=done.created,
                                       warning=await self._unserved([row]))
            case c.EnqueueBatch():
                if len(cmd.jobs) > MAX_BATCH:
                    raise BadRequest(f"at most {MAX_BATCH} jobs per batch, got {len(cmd.jobs)}")
                rows = []
                for i, spec in enumerate(cmd.jobs):
                    try:
                        rows.append(new_job(spec, max_args_bytes=self._max_args_bytes))
                    except JobdError as exc:
                        exc.details["index"] = i
                        raise
                done = await self._store.enqueue_many(rows)
                self._count_enqueued(rows, done)
                return c.BatchResult(ids=[d.id for d in done], created=sum(d.created for d in done),
                                     warning=await self._unserved(rows))
            case c.Get():
                row = await self._store.get_job(cmd.job_id)
                if row is None:
                    raise NotFound(f"no job {cmd.job_id}", details={"id": cmd.job_id})
                return await workflow_view(self._store, job_view(row))
            case c.SendEvent():
                data = msgspec.json.encode(cmd.data)
                if len(data) > self._max_args_bytes:
                    raise JobdError(
                        f"data: {len(data)} bytes of JSON is over the limit of "
                        f"{self._max_args_bytes} bytes (limits.max_args_bytes)",
                        code=ErrorCode.TOO_LARGE,
                        details={"field": "data", "bytes": len(data),
                                 "limit": self._max_args_bytes})
                if has_nul(data):
                    raise BadRequest("data: contains a NUL character (\\u0000), which "
                                     "Postgres cannot store", details={"field": "data"})
                event_id, woken = await self._store.send_event(cmd.name, data.decode())
                return c.SendEventResult(id=event_id, woken=woken)
            case c.Cancel():
                found = await self._store.cancel(cmd.job_id)
                if found is None:
                    raise NotFound(f"no job {cmd.job_id}", details={"id": cmd.job_id})
                was, now = found
                if now == "cancelling":
                    await self._cancel_here(cmd.job_id)
                return c.CancelResult(id=cmd.job_id, was=was, state=now)
            case c.Stats():
                return await self.stats()
            case c.Nodes():
                rows = await self._store.list_daemons()
                return c.NodesResult(daemons=[DaemonView(**r) for r in rows])
            case c.List():
                rows = await self._store.list_jobs(cmd, cmd.cursor, cmd.limit,
                                                   field_bytes=self._list_field_bytes)
                more = len(rows) == cmd.limit
                return c.JobsPage(jobs=[job_view(r) for r in rows],
                                  next_cursor=rows[-1]["id"] if more else None)
            case c.Summary():
                return summary(await self._store.summarize(cmd))
            case c.CancelMany() | c.Retry() | c.Delete() | c.Replay():
                return await self._bulk(cmd)
            case c.Pause() | c.Resume():
                if isinstance(cmd, c.Pause):
                    await self._check_known_queue(cmd.queue)
                    await self._store.pause(cmd.queue, cmd.key)
                else:
                    await self._store.resume(cmd.queue, cmd.key)
                return c.PauseResult(queue=cmd.queue, key=cmd.key,
                                     paused=isinstance(cmd, c.Pause))
            case c.Drain() if self._drain is not None:
                return await self._drain(not cmd.undo)
            case c.Reload() if self._reload is not None:
                return await self._reload()
            case c.Watch():
                return await self._handle(c.Get(job_id=cmd.job_id))
            case (c.ScheduleAdd() | c.ScheduleRemove() | c.SchedulePause() | c.ScheduleResume()
                  | c.ScheduleTrigger() | c.ScheduleList()):
                return await schedule_commands.handle(self._store, cmd)
        raise JobdError(f"unhandled command {type(cmd).__name__}", code=ErrorCode.UNKNOWN_COMMAND)

    async def _bulk(self, cmd: c.CancelMany | c.Retry | c.Delete | c.Replay) -> c.BulkResult:
        if not cmd.has_filter():
            raise BadRequest("a bulk operation needs ids or at least one filter",
                             details={"filters": list(c.FILTER_FIELDS)})
        if isinstance(cmd, c.Replay):
            matched, ids = await self._store.replay_matching(cmd, cmd.dry_run)
            return c.BulkResult(matched=matched, changed=len(ids), dry_run=cmd.dry_run, ids=ids)
        operation = {c.CancelMany: self._store.cancel_matching, c.Retry: self._store.retry_matching,
                     c.Delete: self._store.delete_matching}[type(cmd)]
        matched, changed = await operation(cmd, cmd.dry_run)
        return c.BulkResult(matched=matched, changed=changed, dry_run=cmd.dry_run)

    async def watch(self, cmd: c.Watch) -> AsyncIterator[JobView]:
        """The job now, then again each time it changes, until it is finished.

        Each frame leaves out args/result/errors over `list_field_bytes` (named in
        `truncated`), as list pages do: a frame per change of a job with a 2 MB result
        would be megabytes each time. `get` shows the job whole."""
        last = None
        while True:
            view = await self._watch_view(cmd.job_id)
            snapshot = (view.state, view.attempt, view.progress, view.progress_note)
            if snapshot != last:
                yield view
                last = snapshot
            if view.state in FINISHED:
                return
            await trio.sleep(cmd.interval_s)

    async def _watch_view(self, job_id: int) -> JobView:
        try:
            row = await self._store.get_job(job_id)
            if row is None:
                raise NotFound(f"no job {job_id}", details={"id": job_id})
            view: JobView = await workflow_view(
                self._store, job_view(row, field_bytes=self._list_field_bytes))
            return view
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc

    async def _live_queues(self, wanted: set[str] | None = None) -> set[str]:
        """Queues live daemons serve. Kept a few seconds when it holds all `wanted`: a
        daemon that enqueues for queues other daemons serve must not pay a round trip
        per enqueue, while a queue missing from it is always asked afresh."""
        now = trio.current_time()
        at, queues = self._live_cache
        if wanted is None or now - at > LIVE_QUEUES_TTL_S or not wanted <= queues:
            queues = set(await self._store.live_queues(self._live_s))
            self._live_cache = (now, queues)
        return queues

    async def _unserved(self, rows: list[NewJob]) -> str | None:
        """A warning naming the queues of `rows` that no live daemon serves, else None.

        The common case (this daemon serves the queue) costs no round trip."""
        if self._queues is None:
            return None
        here = self._queues()
        asked = sorted({r.queue for r in rows} - here)
        if not asked:
            return None
        live = await self._live_queues(set(asked))
        missing = [q for q in asked if q not in live]
        if not missing:
            return None
        served = ", ".join(sorted(live | here)) or "none"
        return (f"no live daemon serves queue {', '.join(map(repr, missing))}: the job waits "
                f"until one does (queues served: {served})")

    async def _check_known_queue(self, queue: str) -> None:
        """Pausing a queue nothing serves or declares is almost always a typo: refuse it."""
        if self._queues is None:
            return
        here = self._queues() | self._declared()
        if queue in here:
            return
        live = await self._live_queues()
        if queue in live:
            return
        known = sorted(here | live)
        raise NotFound(f"no live daemon serves queue {queue!r} and the config does not "
                       f"declare it (known queues: {', '.join(known) or 'none'})",
                       details={"queue": queue, "queues": known})

    def _count_enqueued(self, rows: list[NewJob], done: list[Enqueued]) -> None:
        created: dict[tuple[str, str], int] = {}
        for row, d in zip(rows, done, strict=True):
            if d.created:  # a unique-key hit created nothing
                created[row.queue, row.kind] = created.get((row.queue, row.kind), 0) + 1
        for (queue, kind), n in created.items():
            self._observer.jobs_enqueued(queue, kind, n)

    def hello(self, cmd: c.Hello) -> c.HelloResult:
        if cmd.protocol < 1:
            raise JobdError(
                f"protocol {cmd.protocol} is not supported; this daemon speaks 1..{PROTOCOL_VERSION}",
                code=ErrorCode.UNSUPPORTED_PROTOCOL,
                details={"min": 1, "max": PROTOCOL_VERSION},
            )
        return c.HelloResult(
            protocol=min(cmd.protocol, PROTOCOL_VERSION), server=self._server,
            commands=c.COMMAND_NAMES,
        )

    async def stats(self) -> c.StatsResult:
        counts: dict[str, dict[str, int]] = {}
        for queue, state, n in await self._store.stats():
            counts.setdefault(queue, {})[state] = n
        here = self._running_here()
        pauses = self._pauses()
        for queue in [*here, *(q for q, _ in pauses)]:
            counts.setdefault(queue, {})
        limited = [q for q in sorted(counts) if self._flow_limits(q) is not None]
        keys = []
        if limited:
            for row in await self._store.key_stats(None, 200):
                if row["queue"] in limited and (limits := self._flow_limits(row["queue"])) is not None:
                    keys.append(key_stats(row, limits))
        return c.StatsResult(queues=[
            QueueCounts(queue=q, counts=counts[q], running_here=here.get(q, (0, 0))[0],
                        concurrency=here[q][1] if q in here else None,
                        paused=(q, "") in pauses,
                        paused_keys=sorted(k for pq, k in pauses if pq == q and k))
            for q in sorted(counts)
        ], keys=keys)


FINISHED = ("completed", "failed", "cancelled")


def key_stats(row: dict[str, Any], limits: FlowLimits) -> KeyStats:
    """A key's row from the store, read against the queue's configured limits."""
    lim = limits.for_key(row["key"])
    rate = lim.rate
    factor = row["rate_factor"] if lim.adaptive else 1.0
    breaker = "closed"
    threshold = lim.breaker_failures
    now = datetime.now(UTC)
    if threshold is not None and row["consecutive_failures"] >= threshold:
        cooldown = lim.breaker_cooldown_s
        reopens = row["last_failure_at"] + timedelta(
            seconds=BREAKER_COOLDOWN_S if cooldown is None else cooldown)
        breaker = "open" if now < reopens else "half_open"
    paused = row["paused_until"] if row["paused_until"] and row["paused_until"] > now else None
    return KeyStats(
        queue=row["queue"], key=row["key"], running=row["running"], queued=row["queued"],
        concurrency_limit=lim.concurrency, rate_limit=rate,
        effective_rate=rate * factor if rate is not None else None,
        tokens_per_minute=lim.tpm, paused_until=paused, breaker=breaker,
        consecutive_failures=row["consecutive_failures"],
    )


def summary(by_state: dict[str, int]) -> c.SummaryResult:
    def n(*states: str) -> int:
        return sum(by_state.get(s, 0) for s in states)

    return c.SummaryResult(
        total=sum(by_state.values()), queued=n("scheduled", "available", "waiting"),
        running=n("running"), completed=n("completed"), failed=n("failed"),
        cancelled=n("cancelled"), by_state=by_state,
    )


def new_job(spec: JobSpec, *, max_args_bytes: int | None = None) -> NewJob:
    """Validate a spec against its handler's declaration (the edge: fail here, not later)."""
    try:
        jobdef = lookup(spec.kind)
        args = jobdef.decode_args(spec.args)
    except UnknownKind as exc:
        raise JobdError(str(exc), code=ErrorCode.UNKNOWN_KIND, details={"kind": spec.kind}) from None
    except InvalidArgs as exc:
        details: dict[str, Any] = {"kind": spec.kind}
        if exc.field is not None:
            details["field"] = exc.field
        raise JobdError(str(exc), code=ErrorCode.INVALID_ARGS, details=details) from None
    key = spec.key
    cost = spec.cost
    try:
        if key is None and jobdef.key is not None:
            key = str(jobdef.key(args))
        if cost is None and jobdef.cost is not None:
            cost = int(jobdef.cost(args))
    except Exception as exc:  # noqa: BLE001 - the handler's own function, on these args
        raise JobdError(f"{spec.kind}: the handler's key/cost function failed on these args: "
                        f"{exc!r}", code=ErrorCode.INVALID_ARGS,
                        details={"kind": spec.kind}) from None
    delay_s = spec.delay_s
    if spec.run_at is not None:
        run_at = spec.run_at if spec.run_at.tzinfo else spec.run_at.replace(tzinfo=UTC)
        delay_s = (run_at - datetime.now(UTC)).total_seconds()
        if delay_s > DELAY_MAX_S:
            raise BadRequest(f"run_at: at most {DELAY_MAX_S:g} s (ten years) from now, "
                             f"got {spec.run_at.isoformat()}",
                             details={"field": "run_at", "max_delay_s": DELAY_MAX_S})
    max_attempts = spec.max_attempts if spec.max_attempts is not None else jobdef.max_attempts
    if isinstance(max_attempts, int) and max_attempts < 1:
        raise BadRequest("max_attempts must be at least 1", details={"field": "max_attempts"})
    encoded = msgspec.json.encode(args)
    row = NewJob(
        kind=spec.kind,
        args=encoded.decode(),
        queue=spec.queue or jobdef.queue,
        key=key,
        unique_key=spec.unique_key,
        priority=spec.priority if spec.priority is not None else jobdef.priority,
        delay_s=max(delay_s, 0.0) if isinstance(delay_s, int | float) else delay_s,
        max_attempts=max_attempts,
        tags=spec.tags,
        timeout_s=spec.timeout_s if spec.timeout_s is not None else jobdef.timeout_s,
        cost=max(1, cost) if isinstance(cost, int) else (1 if cost is None else cost),
    )
    check_new_job(row, encoded, max_args_bytes)
    return row


def job_view(row: dict[str, Any], *, field_bytes: int | None = None) -> JobView:
    """A job as a client sees it. List rows may come with large fields left out (the SQL
    names them in `truncated`); with `field_bytes` this leaves them out here."""
    decode = msgspec.json.decode
    truncated = list(row.get("truncated") or ())
    raw = {name: row[name] for name in ("args", "result", "errors")}
    note = row["progress_note"]
    if field_bytes is not None:
        for name, value in raw.items():
            if value is not None and _over(value, field_bytes):
                raw[name] = "[]" if name == "errors" else None
                truncated.append(name)
        if note is not None and _over(note, field_bytes):
            note = note[:field_bytes // 4]
            truncated.append("progress_note")
    return JobView(
        id=row["id"], kind=row["kind"], queue=row["queue"], key=row["key"],
        args=decode(raw["args"]) if raw["args"] is not None else None,
        state=row["state"], attempt=row["attempt"],
        max_attempts=row["max_attempts"], priority=row["priority"],
        unique_key=row["unique_key"], tags=list(row["tags"]), progress=row["progress"],
        progress_note=note,
        result=decode(raw["result"]) if raw["result"] is not None else None,
        errors=_errors(raw["errors"]),
        run_at=row["run_at"], created_at=row["created_at"], started_at=row["started_at"],
        finished_at=row["finished_at"], lease_owner=row["lease_owner"],
        cancel_requested=row["cancel_requested"],
        truncated=truncated,
    )


def _errors(raw: str) -> list[AttemptError]:
    try:
        return msgspec.json.decode(raw, type=list[AttemptError])
    except msgspec.ValidationError:
        # Written by hand (SQL) in another shape: shown as text, not an internal error.
        return [AttemptError(attempt=0, error_class="unknown",
                             message=f"errors not in jobd's shape: {raw[:1000]}")]


def _over(text: str, limit: int) -> bool:
    # More characters than bytes allowed is over for sure; else count the UTF-8 bytes.
    return len(text) > limit or len(text.encode()) > limit
