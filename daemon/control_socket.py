"""The control socket: NDJSON frames in, commands to `Control`, replies out.

The file's permissions are the auth (0660 in a directory only the daemon writes), so
socket access equals full control. Each connection is bounded: one line buffer capped
at `MAX_LINE_BYTES`, a handshake deadline, a few requests in flight, and a limit on
connections overall.
"""

from __future__ import annotations

import logging
import os
import socket as stdlib_socket
import struct
from pathlib import Path
from typing import Any

import msgspec
import trio

from actors.control import Control
from protocol import commands as c
from protocol.errors import ErrorCode, JobdError
from protocol.framing import MAX_LINE_BYTES, FrameTooLong, LineBuffer, encode_line

log = logging.getLogger("jobd.control")

HANDSHAKE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 600.0
IN_FLIGHT_PER_CONNECTION = 16


def peer_credentials(sock: trio.socket.SocketType) -> dict[str, int]:
    try:
        raw = sock.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED, 12)
    except OSError:
        return {}
    pid, uid, gid = struct.unpack("3i", raw)
    return {"peer_pid": pid, "peer_uid": uid, "peer_gid": gid}


async def open_listener(path: Path, group: str | None = None) -> trio.SocketListener:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    if path.is_socket() or path.exists():
        path.unlink()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o117)  # the file is born 0660: no window where others can connect
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    if group:
        import grp

        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    sock.listen(128)
    return trio.SocketListener(sock)


class ControlServer:
    def __init__(self, control: Control, *, max_connections: int = 256,
                 max_line: int = MAX_LINE_BYTES):
        self._control = control
        self._max_line = max_line
        self._slots = trio.Semaphore(max_connections)
        self.connections = 0

    async def serve(self, listener: trio.SocketListener,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with listener:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                await _send_quietly(stream, c.Error(
                    code=ErrorCode.TOO_MANY_CONNECTIONS, message="connection limit reached"))
                return
            self.connections += 1
            try:
                await Connection(self._control, stream, self._max_line).run()
            finally:
                self.connections -= 1
                self._slots.release()


class Connection:
    def __init__(self, control: Control, stream: trio.SocketStream, max_line: int):
        self._control = control
        self._stream = stream
        self._buffer = LineBuffer(max_line)
        self._peer = peer_credentials(stream.socket)
        self._greeted = False
        self._send_lock = trio.Lock()
        self._in_flight = trio.Semaphore(IN_FLIGHT_PER_CONNECTION)

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    timeout = IDLE_TIMEOUT_S if self._greeted else HANDSHAKE_TIMEOUT_S
                    with trio.move_on_after(timeout) as idle:
                        data = await self._stream.receive_some(65536)
                    if idle.cancelled_caught:
                        await self._reply(c.Error(code=ErrorCode.BAD_REQUEST,
                                                  message="timed out waiting for a request"))
                        break
                    if not data:
                        break
                    try:
                        lines = self._buffer.feed(data)
                    except FrameTooLong as exc:
                        # The rest of the stream cannot be trusted to be framed: close.
                        await self._reply(c.Error(code=ErrorCode.FRAME_TOO_LONG,
                                                  message=f"line longer than {exc.limit} bytes"))
                        break
                    for line in lines:
                        if line.strip():
                            await self._in_flight.acquire()
                            nursery.start_soon(self._request, line)
                nursery.cancel_scope.deadline = trio.current_time() + 30  # let replies finish
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _request(self, line: bytes) -> None:
        try:
            try:
                reply = await self._answer(line)
                if isinstance(reply, _Stream):
                    await self._stream_replies(reply)
                    return
            except Exception as exc:  # noqa: BLE001 - one bad request must not stop the daemon
                log.exception("control request failed", extra={"event": "control.crashed"})
                reply = c.Error(code=ErrorCode.INTERNAL, message=f"internal error: {exc}")
            await self._reply(reply)
        finally:
            self._in_flight.release()

    async def _answer(self, line: bytes) -> c.Reply | _Stream:
        try:
            envelope = c.envelope_decoder.decode(line)
        except msgspec.ValidationError:  # a subclass of DecodeError: catch it first
            envelope = c._Envelope()
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            # msgspec raises UnicodeDecodeError for invalid UTF-8 inside a JSON string.
            return c.Error(code=ErrorCode.BAD_JSON, message=str(exc))
        request_id = envelope.id if isinstance(envelope.id, int) else None
        try:
            cmd = c.command_decoder.decode(line)
        except msgspec.ValidationError as exc:
            code = ErrorCode.BAD_REQUEST
            if envelope.type is not None and envelope.type not in c.COMMAND_NAMES:
                code = ErrorCode.UNKNOWN_COMMAND
            return c.Error(id=request_id, code=code, message=str(exc))
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            return c.Error(id=request_id, code=ErrorCode.BAD_JSON, message=str(exc))
        if isinstance(cmd, c.Hello):
            try:
                result = self._control.hello(cmd)
            except JobdError as exc:
                return _error(request_id, exc)
            self._greeted = True
            return c.Ok(id=request_id, result=result)
        if not self._greeted:
            return c.Error(id=request_id, code=ErrorCode.HANDSHAKE_REQUIRED,
                           message='send {"type":"hello","protocol":1} first')
        if cmd.mutating:
            log.info("%s from uid %s", envelope.type, self._peer.get("peer_uid"),
                     extra={"event": "control.request", "command": envelope.type,
                            "request_id": request_id, **self._peer})
        if isinstance(cmd, c.Watch):
            return _Stream(request_id, cmd)
        try:
            return c.Ok(id=request_id, result=await self._control.handle(cmd))
        except JobdError as exc:
            return _error(request_id, exc)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the daemon down
            log.exception("control command %s failed", envelope.type,
                          extra={"event": "control.crashed", "command": envelope.type})
            return c.Error(id=request_id, code=ErrorCode.INTERNAL, message=f"internal error: {exc}")

    async def _stream_replies(self, stream: _Stream) -> None:
        """One `more: true` frame per change, then a closing frame without it."""
        try:
            async for view in self._control.watch(stream.cmd):
                await self._reply(c.Ok(id=stream.request_id, result=view, more=True))
        except JobdError as exc:
            await self._reply(_error(stream.request_id, exc))
            return
        await self._reply(c.Ok(id=stream.request_id, result=None, more=False))

    async def _reply(self, reply: c.Reply) -> None:
        async with self._send_lock:
            await self._stream.send_all(encode_line(reply))


class _Stream:
    def __init__(self, request_id: int | None, cmd: c.Watch):
        self.request_id = request_id
        self.cmd = cmd


def _error(request_id: int | None, exc: JobdError) -> c.Error:
    return c.Error(id=request_id, code=str(exc.code), message=exc.message, details=exc.details)


async def _send_quietly(stream: trio.SocketStream, reply: Any) -> None:
    try:
        await stream.send_all(encode_line(reply))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
