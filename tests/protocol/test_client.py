"""The client against a scripted peer: what it raises when replies go wrong.

The peer is a real Unix socket that answers hello and then does one odd thing; every
failure must come out as one JobdError with a code, never as an ExceptionGroup.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from protocol import client as client_module
from protocol.client import connect
from protocol.errors import BadRequest, JobdError, NotFound, Unavailable
from tests.support import wait_until

Script = Callable[[trio.SocketStream, bytes], Awaitable[None]]


async def _serve_once(path: Path, script: Script, task_status: trio.TaskStatus[None]) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(1)
    task_status.started()
    conn, _ = await sock.accept()
    stream = trio.SocketStream(conn)
    async with stream:
        hello = await _line(stream)
        request_id = json.loads(hello)["id"]
        await stream.send_all(json.dumps({"id": request_id, "type": "ok", "result": {
            "protocol": 1, "server": "fake", "commands": ["ping"]}}).encode() + b"\n")
        await script(stream, await _line(stream))
    sock.close()


async def _line(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


async def _ping_against(tmp_path: Path, script: Script) -> JobdError:
    path = tmp_path / "fake.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_once, path, script)
        with pytest.raises(JobdError) as caught:
            async with connect(str(path), timeout=5) as conn:
                await conn.ping()
    return caught.value


PONG = {"daemon_id": "d", "region": "r", "version": "1", "ready": True, "draining": False}


async def test_a_reply_that_never_comes_times_out_and_a_late_one_is_dropped(
        tmp_path: Path) -> None:
    """One timer per connection keeps the calls' deadlines: the silent call fails with
    `timeout` (a tick late at most), the connection stays usable, and the reply that
    comes after the deadline goes to nobody."""
    path = tmp_path / "fake.sock"

    async def silent_then_both(stream: trio.SocketStream, first: bytes) -> None:
        second = await _line(stream)  # the ping after the timeout
        for line, ready in ((first, False), (second, True)):
            await stream.send_all(json.dumps({"id": json.loads(line)["id"], "type": "ok",
                                              "result": {**PONG, "ready": ready}}).encode()
                                  + b"\n")
        await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_once, path, silent_then_both)
        async with connect(str(path), timeout=0.3) as conn:
            started = trio.current_time()
            with pytest.raises(JobdError) as caught:
                await conn.ping()
            took = trio.current_time() - started
            assert caught.value.code == "timeout" and "0.3" in caught.value.message
            assert 0.3 <= took < 1.5
            assert (await conn.ping()).ready is True  # its own reply, not the late one
            assert conn._waiting == {}


async def test_a_reply_over_the_cap_is_a_typed_error(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "MAX_REPLY_BYTES", 4096)

    async def huge(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(b'{"id": 2, "type": "ok", "result": "' + b"x" * 10_000 + b'"}\n')

    error = await _ping_against(tmp_path, huge)
    assert error.code == "frame_too_long" and error.details == {"limit": 4096}


async def test_an_unreadable_reply_is_a_typed_error(tmp_path: Path) -> None:
    async def garbage(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(b"\xff not json\n")

    error = await _ping_against(tmp_path, garbage)
    assert error.code == "bad_json"


async def test_a_reply_of_the_wrong_shape_is_a_typed_error(tmp_path: Path) -> None:
    async def wrong(stream: trio.SocketStream, request: bytes) -> None:
        request_id = json.loads(request)["id"]
        await stream.send_all(json.dumps({"id": request_id, "type": "ok",
                                          "result": {"ready": "maybe"}}).encode() + b"\n")

    error = await _ping_against(tmp_path, wrong)
    assert error.code == "internal" and "unexpected reply" in error.message


async def test_a_closing_error_is_raised_to_the_caller(tmp_path: Path) -> None:
    async def refuse(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(b'{"id": null, "type": "error", "code": "too_many_connections",'
                              b' "message": "connection limit reached", "details": {}}\n')

    error = await _ping_against(tmp_path, refuse)
    assert error.code == "too_many_connections"


async def test_a_plain_close_says_so(tmp_path: Path) -> None:
    async def hang_up(stream: trio.SocketStream, request: bytes) -> None:
        pass

    error = await _ping_against(tmp_path, hang_up)
    assert error.code == "unavailable"
    assert error.message == "connection to jobd lost: jobd closed the connection"


@pytest.mark.parametrize(("code", "error_class"), [
    ("not_found", NotFound), ("bad_request", BadRequest), ("unavailable", Unavailable),
    ("unknown_kind", JobdError), ("some_later_code", JobdError)])
async def test_an_error_reply_raises_the_class_for_its_code(tmp_path: Path, code: str,
                                                            error_class: type) -> None:
    async def answer(stream: trio.SocketStream, request: bytes) -> None:
        request_id = json.loads(request)["id"]
        await stream.send_all(json.dumps({"id": request_id, "type": "error", "code": code,
                                          "message": "no", "details": {"x": 1}}).encode() + b"\n")

    error = await _ping_against(tmp_path, answer)
    assert type(error) is error_class
    assert (error.code, error.message, error.details) == (code, "no", {"x": 1})


# -- SyncClient: one connection, kept ------------------------------------------------------


def test_sync_client_keeps_one_connection_and_reconnects_after_a_restart(jobd) -> None:
    from protocol import SyncClient
    from protocol.errors import JobdError

    # The daemon takes one connection at a time: a client that opened a connection per
    # call while holding another would be refused, and so is a second client.
    daemon = jobd(control={"max_connections": 1})
    with SyncClient(str(daemon.socket), timeout=10) as client:
        ids = [client.enqueue("noop", {}, queue="parked").id for _ in range(50)]
        assert len(set(ids)) == 50
        with SyncClient(str(daemon.socket), timeout=10) as other:
            try:
                other.ping()
                refused = None
            except JobdError as exc:
                refused = exc
        assert refused is not None and refused.code == "too_many_connections"
        assert refused.details == {"limit": 1} and "(1 connections;" in refused.message
        assert client.get(ids[-1]).state == "available"
        daemon.signal(15)
        daemon.wait(60)
        daemon.start()
        # The old connection is gone; the next call opens a new one by itself.
        assert client.get(ids[0]).id == ids[0]
    # After close() the slot is free again, once the daemon has seen the hang-up.
    def free_again() -> bool:
        try:
            with SyncClient(str(daemon.socket), timeout=10) as again:
                return again.ping().ready is True
        except JobdError as exc:
            assert exc.code == "too_many_connections", exc
            return False

    wait_until(free_again, "the closed connection's slot to be free")


def test_sync_client_reports_a_missing_daemon_in_one_typed_error(tmp_path) -> None:
    from protocol import SyncClient
    from protocol.errors import ConnectionFailed

    client = SyncClient(str(tmp_path / "none.sock"), timeout=2)
    for _ in range(2):  # a failed connect leaves the client usable for the next try
        try:
            client.ping()
            raise AssertionError("ping without a daemon answered")
        except ConnectionFailed as exc:
            assert "cannot reach jobd" in exc.message
    client.close()


def test_sync_client_hung_up_on_mid_reply_raises_once_and_reconnects(tmp_path: Path) -> None:
    """The daemon dies halfway through a reply: the call raises unavailable (it may or
    may not have happened: the caller decides), the command is not re-sent, and the next
    call opens a new connection by itself."""
    import socket
    import threading

    from protocol import SyncClient

    path = tmp_path / "fake.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(2)
    requests: list[list[str]] = []

    def serve() -> None:
        for n in range(2):
            conn, _ = server.accept()
            seen: list[str] = []
            requests.append(seen)
            reader = conn.makefile("rb")
            hello = json.loads(reader.readline())
            conn.sendall(json.dumps({"id": hello["id"], "type": "ok", "result": {
                "protocol": 1, "server": "fake", "commands": ["ping"]}}).encode() + b"\n")
            request = json.loads(reader.readline())
            seen.append(request["type"])
            reply = json.dumps({"id": request["id"], "type": "ok", "result": {
                "daemon_id": "d", "region": "r", "version": "v", "ready": True,
                "draining": False}}).encode() + b"\n"
            if n == 0:
                conn.sendall(reply[: len(reply) // 2])  # then the process is gone
                conn.shutdown(socket.SHUT_RDWR)  # (makefile() keeps the fd open past close)
                conn.close()
                continue
            conn.sendall(reply)
            reader.readline()  # until the client closes
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with SyncClient(str(path), timeout=5) as client:
        with pytest.raises(JobdError) as caught:
            client.ping()
        assert caught.value.code == "unavailable"
        assert client.ping().ready is True
    thread.join(5)
    server.close()
    assert requests == [["ping"], ["ping"]]
