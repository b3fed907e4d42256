"""The control socket spoken by hand: raw NDJSON over AF_UNIX against a real daemon.

One daemon serves the whole module (it is never stopped by these tests); the last tests
check it is still healthy after everything thrown at it.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import Limits
from protocol.errors import ErrorCode
from tests.support import JobdProcess

DEADLINE_S = 60.0
FRAME_CAP = Limits().max_frame_bytes  # the daemon's request-line cap by default
HELLO = {"type": "hello", "protocol": 1, "client": "test_socket"}


@pytest.fixture(scope="module")
def daemon(pg_cluster, pg_url: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[JobdProcess]:
    """One `jobd run` for the module, on its own database when the session cluster is ours."""
    name = f"jobd_sock_{uuid.uuid4().hex[:8]}"
    url = pg_cluster.create_database(name) if pg_cluster is not None else pg_url
    proc = JobdProcess(tmp_path_factory.mktemp("sock"), url)
    try:
        proc.start()
        yield proc
    finally:
        proc.kill()
        if pg_cluster is not None:
            pg_cluster.drop_database(name)


class Raw:
    """A bare connection: write bytes, read reply lines."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_json(self, obj: dict[str, Any]) -> None:
        self.send(json.dumps(obj).encode() + b"\n")

    def line(self) -> bytes | None:
        """The next reply line, or None when the daemon closed the connection."""
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def reply(self) -> dict[str, Any]:
        line = self.line()
        assert line is not None, "connection closed instead of a reply"
        return json.loads(line)

    def call(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.send_json(obj)
        return self.reply()

    def hello(self) -> dict[str, Any]:
        reply = self.call({"id": 1, **HELLO})
        assert reply["type"] == "ok", reply
        return reply

    def closed(self) -> bool:
        return self.line() is None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(daemon: JobdProcess) -> Iterator[Raw]:
    conn = Raw(str(daemon.socket))
    yield conn
    conn.close()


def wait_completed(daemon: JobdProcess, job_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        job = daemon.jobctl_json("get", str(job_id))
        if job["state"] == "completed":
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not complete: {job}")


# --------------------------------------------------------------------------- handshake


def test_hello_handshake(raw: Raw) -> None:
    reply = raw.call({"id": 1, **HELLO})
    assert reply["type"] == "ok" and reply["id"] == 1
    result = reply["result"]
    assert result["protocol"] == 1
    assert result["server"].startswith("jobd/")
    assert {"hello", "ping", "enqueue", "get", "cancel", "stats", "tree"} <= set(result["commands"])
    reply = raw.call({"id": 2, "type": "ping"})
    assert reply["type"] == "ok" and reply["id"] == 2 and reply["result"]["ready"] is True


def test_newer_client_protocol_is_answered_with_ours(raw: Raw) -> None:
    reply = raw.call({"id": 1, "type": "hello", "protocol": 99})
    assert reply["type"] == "ok" and reply["result"]["protocol"] == 1


def test_command_before_hello(raw: Raw) -> None:
    reply = raw.call({"id": 5, "type": "ping"})
    assert reply == {"id": 5, "type": "error", "code": "handshake_required",
                     "message": reply["message"], "details": {}}
    reply = raw.call({"id": 6, "type": "enqueue", "job": {"kind": "noop"}})
    assert reply["code"] == "handshake_required" and reply["id"] == 6
    # The connection stays usable: greet, then it works.
    raw.hello()
    assert raw.call({"id": 7, "type": "ping"})["type"] == "ok"


def test_unsupported_protocol(raw: Raw) -> None:
    reply = raw.call({"id": 1, "type": "hello", "protocol": 0})
    assert reply["type"] == "error" and reply["id"] == 1
    assert reply["code"] == "unsupported_protocol"
    assert reply["details"] == {"min": 1, "max": 1}
    # Not greeted by a refused hello.
    assert raw.call({"id": 2, "type": "ping"})["code"] == "handshake_required"


def test_unknown_command(raw: Raw) -> None:
    raw.hello()
    reply = raw.call({"id": 3, "type": "explode"})
    assert reply["type"] == "error" and reply["id"] == 3 and reply["code"] == "unknown_command"


@pytest.mark.parametrize("request_", [
    {"id": 4, "type": "get", "job_id": "seven"},
    {"id": 4, "type": "get"},
    {"id": 4, "type": "hello", "protocol": "1"},
    {"id": 4, "type": "enqueue", "job": {"kind": 5}},
    {"id": 4, "type": "enqueue", "job": "noop"},
    {"id": 4, "type": "enqueue_batch", "jobs": {"kind": "noop"}},
    {"id": 4, "type": "cancel", "job_id": 1.5},
    {"id": 4},
])
def test_wrong_types_are_bad_requests(raw: Raw, request_: dict[str, Any]) -> None:
    raw.hello()
    reply = raw.call(request_)
    assert reply["type"] == "error" and reply["code"] == "bad_request", reply
    assert reply["id"] == 4


def test_a_non_string_type_is_a_bad_request(raw: Raw) -> None:
    # Valid JSON with a wrongly typed envelope is a bad request, not bad JSON.
    raw.hello()
    reply = raw.call({"id": 4, "type": 7})
    assert reply["type"] == "error" and reply["code"] == "bad_request", reply


@pytest.mark.parametrize("value", ["[1, 2]", '"ping"', "3"])
def test_json_that_is_not_an_object(raw: Raw, value: str) -> None:
    raw.hello()
    raw.send(value.encode() + b"\n")
    reply = raw.reply()
    assert reply["type"] == "error" and reply["code"] in ("bad_request", "bad_json")


def test_a_bad_id_is_answered_without_one(raw: Raw) -> None:
    raw.hello()
    reply = raw.call({"id": "abc", "type": "ping"})
    assert reply["type"] == "error" and reply["code"] == "bad_request" and reply["id"] is None


@pytest.mark.parametrize("garbage", [
    b"\x00\xff\xfe not json", b"{", b'{"type": "ping"', b"}{", b"nul", b"\xc3\x28",
    # Invalid UTF-8 inside a JSON string (msgspec raises UnicodeDecodeError for it).
    b'{"type": "pi\xbeng"}', b'{"id": 3, "type": "enqueue", "job": {"kind": "\xff"}}',
])
def test_garbage_is_bad_json_and_the_connection_stays_open(raw: Raw, garbage: bytes) -> None:
    raw.hello()
    raw.send(garbage + b"\n")
    reply = raw.reply()
    assert reply["type"] == "error" and reply["code"] == "bad_json", reply
    assert raw.call({"id": 9, "type": "ping"})["type"] == "ok"


def test_blank_lines_and_crlf_are_fine(raw: Raw) -> None:
    raw.send(b"\n\r\n   \n" + json.dumps({"id": 1, **HELLO}).encode() + b"\r\n")
    reply = raw.reply()
    assert reply["type"] == "ok" and reply["id"] == 1


def test_a_line_of_exactly_the_cap_is_accepted(raw: Raw) -> None:
    raw.hello()
    body = b'{"id": 8, "type": "ping"}'
    raw.send(body + b" " * (FRAME_CAP - len(body)) + b"\n")
    reply = raw.reply()
    assert reply["type"] == "ok" and reply["id"] == 8


@pytest.mark.parametrize("newline", [True, False])
def test_a_line_over_the_cap_closes_the_connection(raw: Raw, newline: bool) -> None:
    raw.hello()
    # Exactly one byte over, so the daemon has read everything we sent when it closes.
    raw.send(b"x" * (FRAME_CAP + 1) + (b"\n" if newline else b""))
    reply = raw.reply()
    assert reply["type"] == "error" and reply["code"] == "frame_too_long"
    assert raw.closed()


def test_concurrent_requests_on_one_connection(raw: Raw) -> None:
    raw.hello()
    ids = list(range(100, 116))
    kinds = ["ping", "stats", "tree", "nodes"]
    raw.send(b"".join(json.dumps({"id": i, "type": kinds[i % 4]}).encode() + b"\n"
                      for i in ids))
    replies = [raw.reply() for _ in ids]
    assert sorted(r["id"] for r in replies) == ids
    assert all(r["type"] == "ok" for r in replies), replies
    by_id = {r["id"]: r for r in replies}
    assert "ready" in by_id[100]["result"]  # ping
    assert "queues" in by_id[101]["result"]  # stats
    assert by_id[102]["result"]["name"] == "root"  # tree


def test_two_connections_interleaved(daemon: JobdProcess) -> None:
    a, b = Raw(str(daemon.socket)), Raw(str(daemon.socket))
    try:
        a.hello()
        assert b.call({"id": 1, "type": "ping"})["code"] == "handshake_required"
        b.hello()
        a.send_json({"id": 21, "type": "ping"})
        b.send_json({"id": 22, "type": "ping"})
        assert b.reply()["id"] == 22
        assert a.reply()["id"] == 21
    finally:
        a.close()
        b.close()


def test_enqueue_and_get_by_hand(raw: Raw, daemon: JobdProcess) -> None:
    raw.hello()
    reply = raw.call({"id": 30, "type": "enqueue", "job": {"kind": "noop"}})
    assert reply["type"] == "ok" and reply["result"]["created"] is True
    job_id = reply["result"]["id"]
    reply = raw.call({"id": 31, "type": "get", "job_id": job_id})
    assert reply["result"]["id"] == job_id
    reply = raw.call({"id": 32, "type": "get", "job_id": 10**12})
    assert reply["code"] == "not_found" and reply["details"] == {"id": 10**12}
    reply = raw.call({"id": 33, "type": "enqueue", "job": {"kind": "no.such.kind"}})
    assert reply["code"] == "unknown_kind"
    wait_completed(daemon, job_id)


def test_socket_file_mode(daemon: JobdProcess) -> None:
    st_ = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st_.st_mode)
    assert stat.S_IMODE(st_.st_mode) == 0o660


# --------------------------------------------------------------------------- fuzzing


VALID: list[dict[str, Any]] = [
    HELLO,
    {"type": "ping"},
    {"type": "tree"},
    {"type": "stats"},
    {"type": "nodes"},
    {"type": "get", "job_id": 1},
    {"type": "enqueue", "job": {"kind": "noop", "args": {}, "tags": ["fuzz"]}},
    {"type": "enqueue", "job": {"kind": "flaky", "args": {"failures": 1}, "priority": 3}},
    {"type": "enqueue_batch", "jobs": [{"kind": "noop"}, {"kind": "noop", "key": "k"}]},
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=10,
)


@st.composite
def mutated_command(draw: st.DrawFn) -> bytes:
    command: dict[str, Any] = json.loads(json.dumps(draw(st.sampled_from(VALID))))
    command["id"] = draw(st.integers(min_value=-(2**63), max_value=2**63 - 1) | json_values)
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["set", "delete", "add", "nested"]))
        keys = sorted(command)
        if action == "set" and keys:
            command[draw(st.sampled_from(keys))] = draw(json_values)
        elif action == "delete" and keys:
            command.pop(draw(st.sampled_from(keys)))
        elif action == "add":
            command[draw(st.text(max_size=10))] = draw(json_values)
        elif action == "nested" and isinstance(command.get("job"), dict):
            command["job"][draw(st.sampled_from(["kind", "args", "queue", "delay_s", "run_at",
                                                 "max_attempts", "timeout_s", "tags"]))] = \
                draw(json_values)
    data = json.dumps(command).encode()
    # Byte-level damage to some of them: truncate, flip, splice.
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "splice"]))
    if damage == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    elif damage == "splice":
        i = draw(st.integers(0, len(data)))
        data = data[:i] + draw(st.binary(max_size=16)) + data[i:]
    return data


payloads = st.lists(st.binary(max_size=200) | mutated_command(), min_size=1, max_size=6)


def expected_replies(data: bytes) -> int:
    """The daemon answers every complete line that is not blank."""
    return sum(1 for line in data.split(b"\n")[:-1] if line.strip())


@pytest.fixture(scope="module")
def job_before_fuzzing(daemon: JobdProcess) -> int:
    return int(daemon.jobctl("enqueue", "sleep", "--args", '{"seconds": 1, "steps": 4}').stdout)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(greet=st.booleans(), lines=payloads)
def test_fuzz_the_socket(daemon: JobdProcess, job_before_fuzzing: int, greet: bool,
                         lines: list[bytes]) -> None:
    # Never cancel anything: the job enqueued before the fuzzing must be left to finish.
    lines = [line for line in lines if b"cancel" not in line]
    data = b"".join(line.replace(b"\n", b" ") + b"\n" if i % 2 else line + b"\n"
                    for i, line in enumerate(lines))
    conn = Raw(str(daemon.socket))
    try:
        if greet:
            conn.hello()
        conn.send(data)
        codes = set(ErrorCode)
        for _ in range(expected_replies(data)):
            line = conn.line()
            assert line is not None, f"connection closed early on {data!r}"
            reply = json.loads(line)
            assert reply["type"] in ("ok", "error"), reply
            if reply["type"] == "error":
                assert reply["code"] in codes, reply
                assert reply["code"] not in ("internal", "frame_too_long"), (reply, data)
        # And the connection is still good.
        if not greet:
            conn.hello()
        reply = conn.call({"id": 424242, "type": "ping"})
        assert reply["type"] == "ok" and reply["id"] == 424242
    finally:
        conn.close()




# --------------------------------------------------------------------------- still healthy


def test_daemon_is_healthy_afterwards(daemon: JobdProcess, job_before_fuzzing: int) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert daemon.jobctl_json("ping")["ready"] is True
    job = wait_completed(daemon, job_before_fuzzing)
    assert job["result"] == {"slept": 1.0}
    job_id = int(daemon.jobctl("enqueue", "noop").stdout)
    wait_completed(daemon, job_id)
    conn = Raw(str(daemon.socket))
    try:
        conn.hello()
        assert conn.call({"id": 1, "type": "ping"})["result"]["ready"] is True
    finally:
        conn.close()
    events = [e.get("event") for e in daemon.log_events()]
    assert "control.crashed" not in events
    assert "daemon.crashed" not in events


def test_connection_limit_refuses_extra_peers_and_stays_up(jobd):
    import socket as socket_module

    daemon = jobd(control={"max_connections": 20})
    held = []
    try:
        for _ in range(20):
            s = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
            s.connect(str(daemon.socket))
            held.append(s)
        extra = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
        extra.settimeout(10)
        extra.connect(str(daemon.socket))
        reply = extra.recv(4096)
        assert b'"too_many_connections"' in reply
        assert extra.recv(4096) == b""  # and closed
        extra.close()
    finally:
        for s in held:
            s.close()
    # Once the idle peers are gone, the daemon answers as before.
    assert daemon.jobctl_json("ping")["ready"] is True
