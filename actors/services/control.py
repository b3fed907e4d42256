"""The control plane: a decoded protocol command in, store calls and actor messages,
a result Struct out.

Accepts every `protocol.commands.Command` (`handle`), plus `hello` (answered without
the store) and `watch` (a stream of views). Transports (daemon/api) own framing, auth
and the envelopes; this owns meaning. Domain problems come back as
`protocol.errors.JobdError` with a stable code. Its views live beside it: jobs in
`job_views`, the dashboard's run detail and activity in `run_views`, flow keys in
`key_views`, the live-queue checks in `live_queues`, the schedule commands in
`schedule_commands`, the webhook ones in `webhook_commands`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

from actors import jobs
from actors.flow import FlowLimits
from actors.handlers import Handlers
from actors.ports import (
    Enqueued,
    NewJob,
    NullObserver,
    Observer,
    Store,
    StoreUnavailable,
    ValueRejected,
)
from actors.services import event_commands, run_views, schedule_commands, webhook_commands
from actors.services.callbacks import Callbacks
from actors.services.enqueuer import Enqueuer
from actors.services.job_views import FINISHED, job_view, summary
from actors.services.key_views import key_stats
from actors.services.live_queues import LiveQueues
from actors.validate import max_args_bytes as validate_max_args_bytes
from actors.workflow import workflow_view
from protocol import commands as c
from protocol.errors import BadRequest, ErrorCode, JobdError, NotFound, Unavailable
from protocol.framing import PROTOCOL_VERSION
from protocol.jobs import DaemonView, JobView, QueueCounts
from protocol.tree import TreeNode

MAX_BATCH = c.MAX_BATCH


class Control:
    def __init__(
        self,
        store: Store,
        *,
        handlers: Handlers,
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
        callbacks: Callbacks | None = None,
        wake_courier: Callable[[], None] = lambda: None,
    ):
        """`queues()`: the queues this daemon serves; an enqueue elsewhere asks the store
        which queues live daemons serve (heartbeat younger than `live_s`). A pause is
        also allowed for the queues the config declares (`declared()`)."""
        self._store = store
        self._enqueuer = Enqueuer(store.enqueue_many)
        self._handlers = handlers
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
        self._callbacks = callbacks
        self._wake_courier = wake_courier
        self._event_sender = event_commands.EventSender(store,
                                                        max_data_bytes=self._max_args_bytes)
        self._queues = LiveQueues(store, here=queues, declared=declared or set,
                                  live_s=live_s) if queues is not None else None

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
                row = jobs.from_spec(self._handlers, cmd.job, max_args_bytes=self._max_args_bytes)
                # Validated alone (a bad spec fails only its caller), written with
                # whoever else is enqueueing now (group commit, services/enqueuer.py).
                done = await self._enqueuer.enqueue(row)
                self._count_enqueued([row], [done])
                return c.EnqueueResult(id=done.id, created=done.created, outcome=done.outcome,
                                       warning=await self._unserved([row]))
            case c.EnqueueBatch():
                if len(cmd.jobs) > MAX_BATCH:
                    raise BadRequest(f"at most {MAX_BATCH} jobs per batch, got {len(cmd.jobs)}")
                rows = []
                for i, spec in enumerate(cmd.jobs):
                    try:
                        rows.append(jobs.from_spec(self._handlers, spec,
                                                   max_args_bytes=self._max_args_bytes))
                    except JobdError as exc:
                        exc.details["index"] = i
                        raise
                enqueued = await self._store.enqueue_many(rows)
                self._count_enqueued(rows, enqueued)
                outcomes = [d.outcome for d in enqueued]
                return c.BatchResult(ids=[d.id for d in enqueued],
                                     created=sum(d.created for d in enqueued),
                                     outcomes=outcomes if any(outcomes) else None,
                                     warning=await self._unserved(rows))
            case c.Get():
                found_job = await self._store.get_job(cmd.job_id)
                if found_job is None:
                    raise NotFound(f"no job {cmd.job_id}", details={"id": cmd.job_id})
                return await workflow_view(self._store, job_view(found_job))
            case c.Inspect():
                return await run_views.run_detail(self._store, cmd.job_id,
                                                  self._list_field_bytes)
            case c.Activity():
                return await run_views.activity(self._store)
            case c.SendEvent() | c.SendEvents() | c.ListEvents():
                return await event_commands.handle(
                    self._store, self._observer, cmd, sender=self._event_sender,
                    max_data_bytes=self._max_args_bytes, list_field_bytes=self._list_field_bytes)
            case c.Cancel():
                found = await self._store.cancel(cmd.job_id)
                if found is None:
                    raise NotFound(f"no job {cmd.job_id}", details={"id": cmd.job_id})
                was, now = found
                if now == "cancelling":
                    await self._cancel_here(cmd.job_id)
                return c.CancelResult(id=cmd.job_id, was=was, state=now)
            case c.Stats():
                return await self.stats(cmd.finished)
            case c.Nodes():
                daemons = await self._store.list_daemons()
                return c.NodesResult(daemons=[DaemonView(**r) for r in daemons])
            case c.List():
                page = await self._store.list_jobs(cmd, cmd.cursor, cmd.limit,
                                                   field_bytes=self._list_field_bytes)
                more = len(page) == cmd.limit
                return c.JobsPage(jobs=[job_view(r) for r in page],
                                  next_cursor=page[-1]["id"] if more else None)
            case c.Summary():
                return summary(await self._store.summarize(cmd))
            case c.CancelMany() | c.Retry() | c.Delete() | c.Replay():
                return await self._bulk(cmd)
            case c.Pause() | c.Resume():
                if isinstance(cmd, c.Pause):
                    if self._queues is not None:
                        await self._queues.check_pausable(cmd.queue)
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
            case c.WebhookList() | c.WebhookReplay():
                return await webhook_commands.handle(self._store, cmd, self._wake_courier)
            case (c.ScheduleAdd() | c.ScheduleRemove() | c.SchedulePause() | c.ScheduleResume()
                  | c.ScheduleTrigger() | c.ScheduleList()):
                return await schedule_commands.handle(self._store, self._handlers, cmd)
            case c.JobComplete() | c.JobFail() | c.JobProgress() | c.JobHeartbeat():
                if self._callbacks is None:
                    raise NotFound("this daemon runs no HTTP kinds")
                return await self._callbacks.handle(cmd)
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

    async def _unserved(self, rows: list[NewJob]) -> str | None:
        return await self._queues.unserved(rows) if self._queues is not None else None

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

    async def stats(self, finished: bool = True) -> c.StatsResult:
        counts: dict[str, dict[str, int]] = {}
        for queue, state, n in await self._store.stats(finished):
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


