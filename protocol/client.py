"""The jobd client: anyio, so the same code runs in asyncio apps and trio apps.

    async with await connect("/run/jobd/eu-west/jobd.sock") as client:
        job = await client.enqueue("listings.refresh", {"marketplace": "ebay"})

One connection carries concurrent requests (matched by request id). `SyncClient`
wraps it for scripts.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import ByteStream
from anyio.from_thread import BlockingPortal

from protocol import commands as c
from protocol.callbacks import CallbackResult, JobComplete, JobFail, JobHeartbeat, JobProgress
from protocol.errors import (
    BadRequest,
    ConnectionFailed,
    ErrorCode,
    JobdError,
    NotFound,
    Unavailable,
)
from protocol.events import EventSpec
from protocol.framing import PROTOCOL_VERSION, FrameTooLong, LineBuffer, encode_line
from protocol.jobs import JobSpec, JobView
from protocol.tree import TreeNode

CLIENT_NAME = "jobd-client/1"
# Replies are capped far above the daemon's request-line cap (limits.max_frame_bytes):
# `get` of a job returns its stored args and result whole, and those may be large (up
# to limits.max_result_bytes each, or more for rows written before a limit was lowered).
MAX_REPLY_BYTES = 64 << 20
# After a failed send, how long to wait for what the daemon sent before it closed (e.g.
# frame_too_long or too_many_connections), so the caller sees that and not EPIPE.
_LAST_WORDS_S = 5.0


def default_socket() -> str:
    return os.environ.get("JOBD_SOCKET") or str(
        Path(os.environ.get("JOBD_STATE_DIR") or Path.home() / ".local/state/jobd") / "jobd.sock"
    )


class Client:
    def __init__(self, stream: ByteStream, timeout: float):
        self._stream = stream
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, Any] = {}  # request id -> send side of its reply stream
        self._send_lock = anyio.Lock(fast_acquire=True)  # rarely contended
        self._buffer = LineBuffer(MAX_REPLY_BYTES)
        self._task_group: Any = None
        self._reader_error: BaseException | None = None
        # Set once the reply reader has stopped: why (a JobdError to raise), and any
        # connection-level error the daemon sent (no id: limit, frame, timeout).
        self._closed: JobdError | None = None
        self._final: c.Error | None = None
        self.server: c.HelloResult | None = None

    async def __aenter__(self) -> Client:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._read_replies)
        self._task_group.start_soon(self._expire)
        try:
            self.server = await self.call(c.Hello(protocol=PROTOCOL_VERSION, client=CLIENT_NAME))
        except BaseException:
            # Refused at the door (a connection limit, a version): leave the task group
            # this task entered, or anyio fails the task for an unexited cancel scope.
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._task_group.cancel_scope.cancel()
        # The body's own exception is not handed to the task group, so callers see a
        # JobdError as itself rather than wrapped in an ExceptionGroup.
        await self._task_group.__aexit__(None, None, None)
        await self._stream.aclose()

    async def call(self, cmd: c.Command) -> Any:
        """Send one command; return its typed result or raise JobdError."""
        async with self._request(cmd, _OneReply(anyio.current_time() + self._timeout)) \
                as replies:
            return self._result(cmd, await self._next(replies))

    async def stream(self, cmd: c.Command) -> AsyncIterator[Any]:
        """Send a streaming command (`watch`); yield each result until the last frame."""
        async with self._request(cmd) as replies:
            while True:
                reply = await self._next(replies)
                if isinstance(reply, c.Ok) and not reply.more:
                    return
                yield self._result(cmd, reply)

    @asynccontextmanager
    async def _request(self, cmd: c.Command,
                       one: _OneReply | None = None) -> AsyncIterator[Any]:
        """`one`: the slot of a command answered by one reply; else a stream's replies
        queue up in a memory stream."""
        request_id = next(self._ids)
        cmd.id = request_id
        if self._closed is not None:  # the reader is gone: nobody would deliver a reply
            raise self._closing_error()
        send: Any
        receive: Any
        if one is not None:
            send = receive = one
        else:
            send, receive = anyio.create_memory_object_stream[c.Reply](math.inf)
        self._waiting[request_id] = send
        try:
            try:
                async with self._send_lock:
                    await self._stream.send(encode_line(cmd))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                # The daemon may have answered and closed while we were still sending
                # (a line over its cap, its connection limit): what it sent is still
                # there to read, and it says why far better than EPIPE does.
                reply: c.Reply | None = None
                with anyio.move_on_after(min(self._timeout, _LAST_WORDS_S)):
                    try:
                        reply = await receive.receive()
                    except (anyio.EndOfStream, TimeoutError):
                        pass
                if isinstance(reply, c.Error):
                    raise _reply_error(reply) from None
                if self._closed is not None:
                    raise self._closing_error() from None
                raise ConnectionFailed(f"connection to jobd lost: {_describe(exc)}") from None
            yield receive
        finally:
            self._waiting.pop(request_id, None)
            send.close()
            receive.close()

    async def _next(self, replies: Any) -> c.Reply:
        try:
            if isinstance(replies, _OneReply):  # its deadline is kept by _expire
                return await replies.receive()
            with anyio.fail_after(self._timeout):
                return await replies.receive()
        except TimeoutError:
            raise JobdError(f"no reply within {self._timeout}s", code="timeout") from None
        except anyio.EndOfStream:
            raise self._closing_error() from None

    def _closing_error(self) -> JobdError:
        if self._final is not None:
            return _reply_error(self._final)
        return self._closed or ConnectionFailed("connection to jobd lost")

    def _result(self, cmd: c.Command, reply: c.Reply) -> Any:
        if isinstance(reply, c.Error):
            raise _reply_error(reply)
        try:
            return msgspec.convert(reply.result, c.RESULT_TYPES[type(cmd)], strict=False)
        except msgspec.ValidationError as exc:
            raise JobdError(f"unexpected reply from jobd to {type(cmd).__name__}: {exc}",
                            code=ErrorCode.INTERNAL) from None

    async def _expire(self) -> None:
        """Times out one-reply commands past their deadline, a tick late at most: one
        timer per connection instead of a cancel scope per call (a tenth of a call's
        client CPU)."""
        tick = min(1.0, max(self._timeout / 10, 0.01))
        while True:
            await anyio.sleep(tick)
            now = anyio.current_time()
            for slot in list(self._waiting.values()):
                if isinstance(slot, _OneReply) and slot.deadline <= now:
                    slot.time_out()

    async def _read_replies(self) -> None:
        closed: JobdError = ConnectionFailed("connection to jobd closed by this client")
        try:
            while True:
                data = await self._stream.receive(65536)
                for line in self._buffer.feed(data):
                    reply = c.reply_decoder.decode(line)
                    if reply.id is None and isinstance(reply, c.Error):
                        # A connection-level error (limit, frame, timeout): fail every
                        # caller, and any that comes later (jobd closes after it).
                        self._final = reply
                        for waiter in self._waiting.values():
                            waiter.send_nowait(reply)
                        continue
                    waiter = self._waiting.get(reply.id) if reply.id is not None else None
                    if waiter is not None:
                        waiter.send_nowait(reply)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError) as exc:
            self._reader_error = exc
            closed = ConnectionFailed(f"connection to jobd lost: {_describe(exc)}")
        except FrameTooLong as exc:
            closed = JobdError(f"reply from jobd longer than {exc.limit} bytes",
                               code=ErrorCode.FRAME_TOO_LONG, details={"limit": exc.limit})
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            closed = JobdError(f"unreadable reply from jobd: {exc}", code=ErrorCode.BAD_JSON)
        finally:
            # Set before the waiters close, so each of them (and any later request)
            # raises the reason rather than a bare "connection lost".
            self._closed = closed
            for waiter in self._waiting.values():
                waiter.close()

    # -- one method per command ---------------------------------------------------

    async def ping(self) -> c.Pong:
        return await self.call(c.Ping())

    async def tree(self) -> TreeNode:
        return await self.call(c.Tree())

    async def enqueue(self, kind: str, args: dict[str, Any] | None = None, **options: Any) -> c.EnqueueResult:
        return await self.call(c.Enqueue(job=JobSpec(kind=kind, args=args or {}, **options)))

    async def enqueue_batch(self, jobs: Sequence[JobSpec]) -> c.BatchResult:
        return await self.call(c.EnqueueBatch(jobs=list(jobs)))

    async def get(self, job_id: int) -> JobView:
        return await self.call(c.Get(job_id=job_id))

    async def cancel(self, job_id: int) -> c.CancelResult:
        return await self.call(c.Cancel(job_id=job_id))

    async def stats(self) -> c.StatsResult:
        return await self.call(c.Stats())

    async def inspect(self, job_id: int) -> c.RunDetail:
        return await self.call(c.Inspect(job_id=job_id))

    async def activity(self) -> c.ActivityResult:
        return await self.call(c.Activity())

    async def nodes(self) -> c.NodesResult:
        return await self.call(c.Nodes())

    async def list(self, *, cursor: int | None = None, limit: int = 50,
                   **where: Any) -> c.JobsPage:
        return await self.call(c.List(cursor=cursor, limit=limit, **where))

    async def summary(self, **where: Any) -> c.SummaryResult:
        return await self.call(c.Summary(**where))

    async def retry(self, *, dry_run: bool = False, **where: Any) -> c.BulkResult:
        return await self.call(c.Retry(dry_run=dry_run, **where))

    async def replay(self, *, dry_run: bool = False, **where: Any) -> c.BulkResult:
        return await self.call(c.Replay(dry_run=dry_run, **where))

    async def delete(self, *, dry_run: bool = False, **where: Any) -> c.BulkResult:
        return await self.call(c.Delete(dry_run=dry_run, **where))

    async def cancel_many(self, *, dry_run: bool = False, **where: Any) -> c.BulkResult:
        return await self.call(c.CancelMany(dry_run=dry_run, **where))

    async def pause(self, queue: str, key: str | None = None) -> c.PauseResult:
        return await self.call(c.Pause(queue=queue, key=key))

    async def resume(self, queue: str, key: str | None = None) -> c.PauseResult:
        return await self.call(c.Resume(queue=queue, key=key))

    async def drain(self, undo: bool = False) -> c.DrainResult:
        return await self.call(c.Drain(undo=undo))

    async def send_event(self, name: str, data: dict[str, Any] | None = None, *,
                         idempotency_key: str | None = None) -> c.SendEventResult:
        return await self.call(c.SendEvent(name=name, data=data or {},
                                           idempotency_key=idempotency_key))

    async def send_events(self, events: Sequence[EventSpec]) -> c.SendEventsResult:
        """Many events in one round trip (and one transaction), answered in order."""
        return await self.call(c.SendEvents(events=list(events)))

    async def list_events(self, name: str | None = None, *, cursor: int | None = None,
                          limit: int = 50) -> c.EventsPage:
        return await self.call(c.ListEvents(name=name, cursor=cursor, limit=limit))

    # An HTTP handler's app calling back (protocol/callbacks.py), with the token its
    # request carried in `callback.token`.
    async def complete_job(self, job_id: int, token: str, result: Any = None) -> CallbackResult:
        return await self.call(JobComplete(job_id=job_id, token=token, result=result))

    async def fail_job(self, job_id: int, token: str, message: str = "failed by the app",
                       retryable: bool = False) -> CallbackResult:
        return await self.call(JobFail(job_id=job_id, token=token, message=message,
                                       retryable=retryable))

    async def job_progress(self, job_id: int, token: str, pct: float | None = None,
                           note: str | None = None) -> CallbackResult:
        return await self.call(JobProgress(job_id=job_id, token=token, pct=pct, note=note))

    async def job_heartbeat(self, job_id: int, token: str) -> CallbackResult:
        return await self.call(JobHeartbeat(job_id=job_id, token=token))

    async def webhook_list(self, *, state: str | None = None, webhook: str | None = None,
                           limit: int = 50, cursor: int | None = None) -> c.WebhooksPage:
        return await self.call(c.WebhookList(state=state, webhook=webhook, limit=limit,
                                             cursor=cursor))

    async def webhook_replay(self, ids: Sequence[int] = (), *,
                             failed: bool = False) -> c.WebhookReplayResult:
        return await self.call(c.WebhookReplay(ids=list(ids), failed=failed))

    async def reload(self) -> c.ReloadResult:
        return await self.call(c.Reload())

    def watch(self, job_id: int, interval_s: float = 0.5) -> AsyncIterator[JobView]:
        """Yields the job each time it changes, ending when it is finished."""
        return self.stream(c.Watch(job_id=job_id, interval_s=interval_s))


class _OneReply:
    """What a one-reply command waits on: the reader's side (`send_nowait`, `close`)
    of a memory stream, at the cost of one event instead of a stream pair."""

    __slots__ = ("_event", "_reply", "deadline", "_timed_out")

    def __init__(self, deadline: float) -> None:
        self._event = anyio.Event()
        self._reply: c.Reply | None = None
        self.deadline = deadline
        self._timed_out = False

    def send_nowait(self, reply: c.Reply) -> None:
        if self._reply is None and not self._event.is_set():
            self._reply = reply
            self._event.set()

    def close(self) -> None:
        self._event.set()

    def time_out(self) -> None:
        if not self._event.is_set():
            self._timed_out = True
            self._event.set()

    async def receive(self) -> c.Reply:
        await self._event.wait()
        if self._reply is None:
            if self._timed_out:
                raise TimeoutError
            raise anyio.EndOfStream
        return self._reply


# An error reply raises the subclass for its code where there is one, so a caller can
# `except NotFound`; every other code is a JobdError carrying that code.
_ERROR_CLASSES: dict[str, type[JobdError]] = {cls.code: cls for cls in (NotFound, BadRequest,
                                                                        Unavailable)}


def _reply_error(reply: c.Error) -> JobdError:
    error_class = _ERROR_CLASSES.get(reply.code, JobdError)
    return error_class(reply.message, code=reply.code, details=reply.details)


def _describe(exc: BaseException) -> str:
    """anyio's stream errors carry no text of their own; the OSError behind one does."""
    if isinstance(exc, anyio.EndOfStream):
        return "jobd closed the connection"
    cause = exc.__cause__ or exc.__context__
    text = str(exc) or (str(cause) if cause is not None else "") or type(exc).__name__
    return text


class _Connecting:
    """`async with await connect(...)` and `async with connect(...)` both work."""

    def __init__(self, path: str | None, timeout: float):
        self._path = path or default_socket()
        self._timeout = timeout
        self._client: Client | None = None

    def __await__(self):  # type: ignore[no-untyped-def]
        return self._open().__await__()

    async def _open(self) -> Client:
        try:
            stream = await anyio.connect_unix(self._path)
        except OSError as exc:
            raise ConnectionFailed(
                f"cannot reach jobd at {self._path}: {exc.strerror or exc} (is the daemon running?)"
            ) from exc
        return Client(stream, self._timeout)

    async def __aenter__(self) -> Client:
        self._client = await self._open()
        return await self._client.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        assert self._client is not None
        await self._client.__aexit__(*exc_info)


def connect(socket_path: str | None = None, *, timeout: float = 30.0) -> _Connecting:
    return _Connecting(socket_path, timeout)


class SyncClient:
    """Blocking calls for scripts and jobctl, over one connection: opened at the first
    call, kept until `close()` (or the end of a `with` block), its requests pipelined
    like an async Client's. The connection lives on an event loop in a daemon thread, so
    a script that forgets `close()` still exits. A call that finds the connection
    already gone (the daemon restarted) opens a new one; a command is never re-sent.
    Not for use from inside an event loop: use `connect()` there."""

    def __init__(self, socket_path: str | None = None, *, timeout: float = 30.0):
        self.socket_path = self._path = socket_path
        self.timeout = self._timeout = timeout
        self._lock = threading.Lock()
        self._portal: BlockingPortal | None = None
        self._client: Client | None = None
        self._release: anyio.Event | None = None
        self._connections: Any = None  # the task group holding the connection

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def call(self, cmd: c.Command) -> Any:
        return self._blocking("call", cmd)

    def __getattr__(self, name: str) -> Any:
        method = getattr(Client, name, None)
        if method is None or name.startswith("_"):
            raise AttributeError(name)
        return functools.partial(self._blocking, name)

    def close(self) -> None:
        """Close the connection and stop its thread; the next call opens them again."""
        with self._lock:
            portal, self._portal = self._portal, None
            if portal is not None:
                portal.call(self._drop)
                portal.call(portal.stop)

    def _blocking(self, name: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            portal = self._portal or self._start_portal()
            client = portal.call(self._connected)
        return portal.call(functools.partial(getattr(client, name), *args, **kwargs))

    def _start_portal(self) -> BlockingPortal:
        ready: queue.Queue[BlockingPortal] = queue.Queue()

        async def serve() -> None:
            async with BlockingPortal() as portal, anyio.create_task_group() as tg:
                self._connections = tg
                ready.put(portal)
                await portal.sleep_until_stopped()
                tg.cancel_scope.cancel()

        threading.Thread(target=anyio.run, args=(serve,), name="jobd-sync-client",
                         daemon=True).start()
        self._portal = ready.get()
        return self._portal

    async def _connected(self) -> Client:
        """The open connection, or a new one where there is none or it has closed."""
        if self._client is not None and self._client._closed is None:
            return self._client
        await self._drop()
        client: Client = await self._connections.start(self._hold)
        self._client = client
        return client

    async def _hold(self, *, task_status: Any) -> None:
        # The connection's task group must be entered and left by one task: this one.
        release = self._release = anyio.Event()
        async with connect(self._path, timeout=self._timeout) as client:
            task_status.started(client)
            await release.wait()

    async def _drop(self) -> None:
        if self._release is not None:
            self._release.set()
        self._release = self._client = None
