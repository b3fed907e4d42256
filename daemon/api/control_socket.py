"""The control socket: NDJSON frames in, commands to `Control`, replies out.

The file's permissions are the auth (0660 in a directory only the daemon writes), so
socket access equals full control. Each connection is bounded: one line buffer capped
at `limits.max_frame_bytes`, a handshake deadline, an idle deadline, a few requests in
flight, a bound on how long one reply write may block, and a limit on connections
overall.

Each connection is a boundary: whatever ends it (a peer that hangs up or stops reading,
a bug in a request) is logged once, counted in
`jobd_control_connections_dropped_total{reason}` and closes that connection only.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket as stdlib_socket
import struct
from collections.abc import Callable
from pathlib import Path

import trio

from actors.services.control import Control
from daemon.api.requests import Peer, Requests, error
from protocol import commands as c
from protocol.errors import ErrorCode, JobdError
from protocol.framing import MAX_LINE_BYTES, FrameTooLong, LineBuffer, encode_line

log = logging.getLogger("jobd.control")

HANDSHAKE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 600.0  # no request received and none being answered (a watch is not idle)
IN_FLIGHT_PER_CONNECTION = 16
# A peer that stops reading fills the socket buffer; a reply write that makes no
# progress for this long closes the connection instead of holding its tasks forever.
SEND_TIMEOUT_S = 30.0
_SEND_CHUNK = 256 * 1024
# After an error that ends a connection (frame too long, limit reached, timeout) the
# daemon stops writing and reads on (discarding) this long, so a peer still sending
# finishes its send and reads the error instead of getting EPIPE/ECONNRESET.
LINGER_S = 2.0
ACCEPT_RETRY_S = 0.1  # accept() out of descriptors or memory: wait, then try again
_HANGUP = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


class _Drop(Exception):
    """Ends one connection on purpose; `reason` is the counter's label."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    sock.listen(128)
    return trio.SocketListener(sock)


class ControlServer:
    def __init__(self, control: Control, *, max_connections: int = 256,
                 max_line: int = MAX_LINE_BYTES,
                 on_drop: Callable[[str], None] = lambda reason: None,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 idle_timeout_s: float = IDLE_TIMEOUT_S,
                 send_timeout_s: float = SEND_TIMEOUT_S):
        self._control = control
        self._requests = Requests(control, "control")
        self._max_line = max_line
        self._max_connections = max_connections
        self._slots = trio.Semaphore(max_connections)
        self._on_drop = on_drop
        self._timeouts = (handshake_timeout_s, idle_timeout_s, send_timeout_s)
        self.connections = 0

    async def serve(self, listener: trio.SocketListener,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with listener:
            async with trio.open_nursery() as nursery:
                task_status.started()
                failures = 0
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:
                        # EMFILE/ENFILE (out of descriptors), ENOBUFS/ENOMEM: the pending
                        # peer waits in the backlog; try again once something is freed.
                        self._on_drop("accept_failed")
                        if not failures:
                            log.warning("control socket accept failed (%s); retrying",
                                        errno.errorcode.get(exc.errno or 0, exc),
                                        extra={"event": "control.accept_failed",
                                               "errno": exc.errno})
                        failures += 1
                        await trio.sleep(ACCEPT_RETRY_S)
                        continue
                    if failures:
                        log.info("control socket accepts again after %d failures", failures,
                                 extra={"event": "control.accept_recovered"})
                        failures = 0
                    nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        reason: str | None = None
        try:
            async with stream:
                try:
                    self._slots.acquire_nowait()
                except trio.WouldBlock:
                    reason = "too_many_connections"
                    await _close_with(stream, c.Error(
                        code=ErrorCode.TOO_MANY_CONNECTIONS,
                        message=f"connection limit reached ({self._max_connections} "
                                "connections; control.max_connections)",
                        details={"limit": self._max_connections}), self._timeouts[2])
                    return
                self.connections += 1
                try:
                    reason = await Connection(self._control, self._requests, stream,
                                              self._max_line,
                                              *self._timeouts).run()
                finally:
                    self.connections -= 1
                    self._slots.release()
        except* Exception as group:  # the connection's boundary; Cancelled passes on
            reason = _reason(group)
            if reason in ("hung_up", "send_timeout"):
                log.info("control connection dropped: %s", reason.replace("_", " "),
                         extra={"event": "control.dropped", "reason": reason})
            else:
                log.error("control connection failed", exc_info=group,
                          extra={"event": "control.dropped", "reason": reason})
        finally:
            if reason is not None:
                self._on_drop(reason)


def _reason(group: BaseExceptionGroup[Exception]) -> str:
    leaves = _leaves(group)
    for exc in leaves:
        if isinstance(exc, _Drop):
            return exc.reason
    if all(isinstance(exc, _HANGUP) for exc in leaves):
        return "hung_up"
    return "error"


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


class Connection:
    def __init__(self, control: Control, requests: Requests, stream: trio.SocketStream,
                 max_line: int,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 idle_timeout_s: float = IDLE_TIMEOUT_S,
                 send_timeout_s: float = SEND_TIMEOUT_S):
        self._control = control
        self._requests = requests
        self._stream = stream
        self._buffer = LineBuffer(max_line)
        creds = peer_credentials(stream.socket)
        self._peer = Peer(f"from uid {creds.get('peer_uid')}", creds)
        self._greeted = False
        self._send_lock = trio.Lock()
        self._in_flight = trio.Semaphore(IN_FLIGHT_PER_CONNECTION)
        self._handshake_timeout = handshake_timeout_s
        self._idle_timeout = idle_timeout_s
        self._send_timeout = send_timeout_s
        self._busy = 0  # requests being answered (a watch for as long as it streams)
        self._last = trio.current_time()  # last request received or reply finished

    def _deadline(self) -> float:
        return self._last + (self._idle_timeout if self._greeted else self._handshake_timeout)

    async def run(self) -> str | None:
        """Serve until the peer closes (None) or the connection must end (the reason)."""
        final: c.Error | None = None
        reason: str | None = None
        async with trio.open_nursery() as nursery:
            while True:
                with trio.move_on_at(self._deadline()) as idle:
                    data = await self._stream.receive_some(65536)
                if idle.cancelled_caught:
                    # The deadline is read again: a hello answered while this wait was
                    # armed with the handshake deadline, or a request still running
                    # (a watch may stream for hours), keeps the connection.
                    if self._busy:
                        self._last = trio.current_time()
                        continue
                    if trio.current_time() < self._deadline():
                        continue
                    reason = "idle_timeout" if self._greeted else "handshake_timeout"
                    final = c.Error(code=ErrorCode.BAD_REQUEST,
                                    message="timed out waiting for a request")
                    break
                if not data:
                    break
                self._last = trio.current_time()
                try:
                    lines = self._buffer.feed(data)
                except FrameTooLong as exc:
                    # The rest of the stream cannot be trusted to be framed: close.
                    reason = "frame_too_long"
                    final = c.Error(code=ErrorCode.FRAME_TOO_LONG,
                                    message=f"request line longer than {exc.limit} bytes "
                                            "(limits.max_frame_bytes); connection closed",
                                    details={"limit": exc.limit})
                    break
                for line in lines:
                    if line.strip():
                        await self._in_flight.acquire()
                        self._busy += 1
                        nursery.start_soon(self._request, line)
            if final is not None:
                # The error is the connection's last frame: every waiting request of
                # the peer learns why (the client hands an id-less error to all).
                nursery.cancel_scope.cancel()
            else:
                nursery.cancel_scope.deadline = trio.current_time() + 30  # let replies finish
        if final is not None:
            await _close_with(self._stream, final, self._send_timeout)
        return reason

    async def _request(self, line: bytes) -> None:
        try:
            try:
                reply = await self._answer(line)
                if isinstance(reply, _Stream):
                    await self._stream_replies(reply)
                    return
            except (_Drop, *_HANGUP):
                raise  # the connection is over (a watch's peer left): its boundary says so
            except Exception as exc:  # noqa: BLE001 - one bad request must not stop the daemon
                log.exception("control request failed", extra={"event": "control.crashed"})
                reply = c.Error(code=ErrorCode.INTERNAL, message=f"internal error: {exc}")
            await self._reply(reply)
        finally:
            self._busy -= 1
            self._last = trio.current_time()
            self._in_flight.release()

    async def _answer(self, line: bytes) -> c.Reply | _Stream:
        cmd = self._requests.decode_line(line)
        if isinstance(cmd, c.Error):
            return cmd
        if not self._greeted and not isinstance(cmd, c.Hello):
            return c.Error(id=cmd.id, code=ErrorCode.HANDSHAKE_REQUIRED,
                           message='send {"type":"hello","protocol":1} first')
        if isinstance(cmd, c.Watch):
            return _Stream(cmd.id, cmd)
        try:
            reply = await self._requests.answer(cmd, self._peer, cmd.id)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the daemon down
            # Answered with the request's id: an id-less error would reach every request
            # the peer has waiting (the client hands those to all).
            name = type(cmd).__struct_config__.tag
            log.exception("control command %s failed", name,
                          extra={"event": "control.crashed", "command": name})
            return c.Error(id=cmd.id, code=ErrorCode.INTERNAL, message=f"internal error: {exc}")
        if isinstance(cmd, c.Hello) and isinstance(reply, c.Ok):
            self._greeted = True
        return reply

    async def _stream_replies(self, stream: _Stream) -> None:
        """One `more: true` frame per change, then a closing frame without it."""
        try:
            async for view in self._control.watch(stream.cmd):
                await self._reply(c.Ok(id=stream.request_id, result=view, more=True))
        except JobdError as exc:
            await self._reply(error(exc, stream.request_id))
            return
        await self._reply(c.Ok(id=stream.request_id, result=None, more=False))

    async def _reply(self, reply: c.Reply) -> None:
        data = memoryview(encode_line(reply))
        async with self._send_lock:
            # In chunks, each with its own deadline: a slow reader of a big reply is
            # fine, a peer that reads nothing for SEND_TIMEOUT_S is dropped.
            for start in range(0, len(data), _SEND_CHUNK):
                with trio.move_on_after(self._send_timeout) as stuck:
                    await self._stream.send_all(data[start:start + _SEND_CHUNK])
                if stuck.cancelled_caught:
                    raise _Drop("send_timeout")


class _Stream:
    def __init__(self, request_id: int | None, cmd: c.Watch):
        self.request_id = request_id
        self.cmd = cmd


async def _close_with(stream: trio.SocketStream, reply: c.Error, send_timeout: float) -> None:
    """Send a last error, stop writing, and read on (discarding) for up to LINGER_S.

    Closing with unread input would make the peer's pending send fail (EPIPE or
    ECONNRESET) before it gets to read the error; reading on lets it see why.
    """
    try:
        with trio.move_on_after(send_timeout):
            await stream.send_all(encode_line(reply))
        await stream.send_eof()
        with trio.move_on_after(LINGER_S):
            while await stream.receive_some(65536):
                pass
    except _HANGUP:
        pass  # the peer is gone already: nobody left to tell
