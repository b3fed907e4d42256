"""The jobd client: anyio, so the same code runs in asyncio apps and trio apps.

    async with await connect("/run/jobd/eu-west/jobd.sock") as client:
        job = await client.enqueue("listings.refresh", {"marketplace": "ebay"})

One connection carries concurrent requests (matched by request id). `SyncClient`
wraps it for scripts.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import ObjectStream

from protocol import commands as c
from protocol.errors import ConnectionFailed, JobdError
from protocol.framing import PROTOCOL_VERSION, LineBuffer, encode_line
from protocol.jobs import JobSpec, JobView
from protocol.tree import TreeNode

CLIENT_NAME = "jobd-client/1"


def default_socket() -> str:
    return os.environ.get("JOBD_SOCKET") or str(
        Path(os.environ.get("JOBD_STATE_DIR") or Path.home() / ".local/state/jobd") / "jobd.sock"
    )


class Client:
    def __init__(self, stream: ObjectStream[bytes] | Any, timeout: float):
        self._stream = stream
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[anyio.Event, list[c.Reply]]] = {}
        self._send_lock = anyio.Lock()
        self._buffer = LineBuffer()
        self._task_group: Any = None
        self._reader_error: BaseException | None = None
        self.server: c.HelloResult | None = None

    async def __aenter__(self) -> Client:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._read_replies)
        self.server = await self.call(c.Hello(protocol=PROTOCOL_VERSION, client=CLIENT_NAME))
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._task_group.cancel_scope.cancel()
        # The body's own exception is not handed to the task group, so callers see a
        # JobdError as itself rather than wrapped in an ExceptionGroup.
        await self._task_group.__aexit__(None, None, None)
        await self._stream.aclose()

    async def call(self, cmd: c.Command) -> Any:
        """Send one command; return its typed result or raise JobdError."""
        request_id = next(self._ids)
        cmd.id = request_id
        done = anyio.Event()
        slot: list[c.Reply] = []
        self._waiting[request_id] = (done, slot)
        try:
            async with self._send_lock:
                await self._stream.send(encode_line(cmd))
            with anyio.fail_after(self._timeout):
                await done.wait()
        except TimeoutError:
            raise JobdError(f"no reply within {self._timeout}s", code="timeout") from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ConnectionFailed(f"connection to jobd lost: {exc}") from exc
        finally:
            self._waiting.pop(request_id, None)
        if not slot:
            raise ConnectionFailed(f"connection to jobd lost: {self._reader_error}")
        reply = slot[0]
        if isinstance(reply, c.Error):
            raise JobdError(reply.message, code=reply.code, details=reply.details)
        return msgspec.convert(reply.result, c.RESULT_TYPES[type(cmd)], strict=False)

    async def _read_replies(self) -> None:
        try:
            while True:
                data = await self._stream.receive(65536)
                for line in self._buffer.feed(data):
                    reply = c.reply_decoder.decode(line)
                    waiter = self._waiting.get(reply.id) if reply.id is not None else None
                    if waiter is None and reply.id is None and isinstance(reply, c.Error):
                        # A connection-level error (limit, handshake): fail every caller.
                        for done, slot in self._waiting.values():
                            slot.append(reply)
                            done.set()
                        continue
                    if waiter is not None:
                        waiter[1].append(reply)
                        waiter[0].set()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError) as exc:
            self._reader_error = exc or "closed by jobd"
        finally:
            for done, _slot in self._waiting.values():
                done.set()

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

    async def nodes(self) -> c.NodesResult:
        return await self.call(c.Nodes())


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
    """Blocking calls for scripts: each call opens a connection, sends, and closes."""

    def __init__(self, socket_path: str | None = None, *, timeout: float = 30.0):
        self._path = socket_path
        self._timeout = timeout

    def call(self, cmd: c.Command) -> Any:
        async def once() -> Any:
            async with connect(self._path, timeout=self._timeout) as client:
                return await client.call(cmd)

        return anyio.run(once)

    def __getattr__(self, name: str) -> Any:
        method = getattr(Client, name, None)
        if method is None or name.startswith("_"):
            raise AttributeError(name)

        def blocking(*args: Any, **kwargs: Any) -> Any:
            async def once() -> Any:
                async with connect(self._path, timeout=self._timeout) as client:
                    return await getattr(client, name)(*args, **kwargs)

            return anyio.run(once)

        return blocking
