"""The control server's own timing and failure rules, on a fake clock.

A real socket pair carries the bytes; the control behind it is a stand-in that answers
every command with a large result (what it answers does not matter here, only that
replies are big enough to fill a socket buffer).
"""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest
import trio
import trio.testing

from daemon.api.control_socket import ControlServer
from protocol import commands as c

HELLO = json.dumps({"id": 1, "type": "hello", "protocol": 1}).encode() + b"\n"


class BigControl:
    def hello(self, cmd: c.Hello) -> c.HelloResult:
        return c.HelloResult(protocol=1, server="test", commands=["hello", "ping"])

    async def handle(self, cmd: c.Command) -> Any:
        return {"blob": "x" * 200_000}


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def _pair(server: ControlServer, nursery: trio.Nursery) -> trio.socket.SocketType:
    ours, theirs = trio.socket.socketpair()
    nursery.start_soon(server._connection, trio.SocketStream(theirs))
    return ours


async def _read_line(sock: trio.socket.SocketType, buffer: bytearray) -> bytes | None:
    while b"\n" not in buffer:
        chunk = await sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    end = buffer.index(b"\n")
    line = bytes(buffer[:end])
    del buffer[:end + 1]
    return line


async def test_a_peer_that_stops_reading_is_dropped_after_the_send_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    drops: list[str] = []
    server = ControlServer(BigControl(), on_drop=drops.append, send_timeout_s=30)
    with trio.fail_after(3600):  # on the fake clock: fails at once if nothing ends it
        async with trio.open_nursery() as nursery:
            sock = await _pair(server, nursery)
            await sock.send(HELLO + b"".join(
                json.dumps({"id": i, "type": "ping"}).encode() + b"\n" for i in range(2, 18)))
            # Read nothing: 16 replies of 200 kB fill every buffer and the writes stall;
            # the nursery ends when the server gives up on the connection.
    assert drops == ["send_timeout"]
    assert server.connections == 0
    sock.close()


async def test_hello_then_idle_keeps_the_connection(
        autojump_clock: trio.testing.MockClock) -> None:
    drops: list[str] = []
    server = ControlServer(BigControl(), on_drop=drops.append, handshake_timeout_s=10,
                           idle_timeout_s=600)
    async with trio.open_nursery() as nursery:
        sock = await _pair(server, nursery)
        buf = bytearray()
        await sock.send(HELLO)
        assert json.loads(await _read_line(sock, buf) or b"null")["type"] == "ok"
        await trio.sleep(300)  # far past the handshake deadline, within the idle one
        await sock.send(b'{"id": 2, "type": "ping"}\n')
        assert json.loads(await _read_line(sock, buf) or b"null")["id"] == 2
        await trio.sleep(601)  # now past the idle deadline too
        reply = json.loads(await _read_line(sock, buf) or b"null")
        assert reply["message"] == "timed out waiting for a request"
        assert await _read_line(sock, buf) is None
        sock.close()
    assert drops == ["idle_timeout"]


async def test_no_hello_times_out(autojump_clock: trio.testing.MockClock) -> None:
    drops: list[str] = []
    server = ControlServer(BigControl(), on_drop=drops.append, handshake_timeout_s=10)
    async with trio.open_nursery() as nursery:
        sock = await _pair(server, nursery)
        buf = bytearray()
        reply = json.loads(await _read_line(sock, buf) or b"null")
        assert reply["message"] == "timed out waiting for a request"
        sock.close()
    assert drops == ["handshake_timeout"]


class FailingListener(trio.abc.Listener[trio.SocketStream]):
    """Fails accept() with EMFILE/ENFILE a few times, then hands out one real stream."""

    def __init__(self, stream: trio.SocketStream):
        self.failures = [errno.EMFILE, errno.ENFILE, errno.EMFILE]
        self.stream: trio.SocketStream | None = stream

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        if self.failures:
            code = self.failures.pop(0)
            raise OSError(code, "Too many open files")
        if self.stream is None:
            await trio.sleep_forever()
        stream, self.stream = self.stream, None
        assert stream is not None
        return stream

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_accept_out_of_descriptors_retries(autojump_clock: trio.testing.MockClock) -> None:
    drops: list[str] = []
    server = ControlServer(BigControl(), on_drop=drops.append)
    ours, theirs = trio.socket.socketpair()
    listener = FailingListener(trio.SocketStream(theirs))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, listener)
        buf = bytearray()
        await ours.send(HELLO)
        assert json.loads(await _read_line(ours, buf) or b"null")["type"] == "ok"
        nursery.cancel_scope.cancel()
    ours.close()
    assert drops == ["accept_failed"] * 3


class BuggyControl(BigControl):
    async def handle(self, cmd: c.Command) -> Any:
        if isinstance(cmd, c.Ping):
            raise RuntimeError("a bug")
        return {"ok": True}


async def test_a_command_that_crashes_is_internal_with_its_id_and_the_connection_lives(
        autojump_clock: trio.testing.MockClock) -> None:
    """The id matters: the client hands an id-less error to every request it has waiting."""
    drops: list[str] = []
    server = ControlServer(BuggyControl(), on_drop=drops.append)
    async with trio.open_nursery() as nursery:
        sock = await _pair(server, nursery)
        buf = bytearray()
        await sock.send(HELLO)
        assert json.loads(await _read_line(sock, buf) or b"null")["type"] == "ok"
        await sock.send(b'{"id": 2, "type": "ping"}\n')
        crashed = json.loads(await _read_line(sock, buf) or b"null")
        assert (crashed["id"], crashed["code"]) == (2, "internal")
        assert "a bug" in crashed["message"]
        await sock.send(b'{"id": 3, "type": "stats"}\n')
        assert json.loads(await _read_line(sock, buf) or b"null") == {
            "id": 3, "type": "ok", "result": {"ok": True}, "more": False}
        sock.close()
    assert drops == []
