"""daemon.api.requests: the request path both transports share (decode, audit, envelope).

The transports' own tests (tests/protocol/test_socket.py, tests/daemon/test_http.py)
pin what comes out on the wire; these pin the shared step once.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from daemon.api.requests import COMMANDS, Peer, Requests
from protocol import commands as c
from protocol.errors import ErrorCode, JobdError, NotFound
from protocol.jobs import JobSpec


class Answering:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def hello(self, cmd: c.Hello) -> c.HelloResult:
        return c.HelloResult(protocol=1, server="test", commands=c.COMMAND_NAMES)

    async def handle(self, cmd: Any) -> Any:
        self.seen.append(cmd)
        if isinstance(cmd, c.Get):
            raise NotFound("no job 9", details={"id": 9})
        if isinstance(cmd, c.Nodes):
            raise RuntimeError("a bug")
        return {"done": True}


@pytest.mark.parametrize(("line", "code", "request_id"), [
    (b"{not json", ErrorCode.BAD_JSON, None),
    (b'{"id": 3, "type": "frobnicate"}', ErrorCode.UNKNOWN_COMMAND, 3),
    (b'{"id": 4, "type": "get", "job_id": "x"}', ErrorCode.BAD_REQUEST, 4),
    (b'{"id": "odd", "type": "get", "job_id": 1}', ErrorCode.BAD_REQUEST, None),
    (b'{"id": 5, "type": "send_event", "name": "\xff"}', ErrorCode.BAD_JSON, 5),
])
def test_a_line_that_is_not_a_command_is_an_error_with_the_id_it_could_read(
        line: bytes, code: ErrorCode, request_id: int | None) -> None:
    reply = Requests(Answering(), "control").decode_line(line)
    assert isinstance(reply, c.Error)
    assert (reply.code, reply.id) == (code, request_id)


def test_a_line_and_a_body_decode_to_the_same_command() -> None:
    requests = Requests(Answering(), "http")
    line = requests.decode_line(b'{"id": 1, "type": "enqueue", "job": {"kind": "noop"}}')
    body = requests.decode_body("enqueue", b'{"job": {"kind": "noop"}}')
    assert isinstance(line, c.Enqueue) and isinstance(body, c.Enqueue)
    assert line.job == body.job == JobSpec(kind="noop")
    assert requests.decode_body("ping", b"") == c.Ping()  # no body: no fields
    with pytest.raises(JobdError) as info:
        requests.decode_body("get", b'{"job_id": -1}')
    assert info.value.code == ErrorCode.BAD_REQUEST and "job_id" in info.value.message
    assert set(COMMANDS) == set(c.COMMAND_NAMES)


async def test_a_mutating_command_is_audited_with_who_sent_it(caplog) -> None:
    caplog.set_level(logging.INFO)
    requests = Requests(Answering(), "control")
    peer = Peer("from uid 1000", {"peer_uid": 1000, "peer_pid": 7})
    reply = await requests.answer(c.Cancel(job_id=3), peer, 12)
    assert reply == c.Ok(id=12, result={"done": True})
    await requests.answer(c.Ping(), peer, 13)  # reads are not audited
    await requests.answer(c.Enqueue(job=JobSpec(kind="noop")), peer, 14)  # debug only
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "control.request"]
    # What it acted on is in the line: who cancelled which job.
    assert record.name == "jobd.control"
    assert record.getMessage() == "cancel from uid 1000: job_id=3"
    assert record.target == "job_id=3" and record.levelno == logging.INFO
    assert (record.command, record.request_id, record.peer_uid, record.peer_pid) == (
        "cancel", 12, 1000, 7)


async def test_an_enqueue_is_audited_at_debug(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    requests = Requests(Answering(), "control")
    peer = Peer("from uid 1000", {"peer_uid": 1000})
    await requests.answer(c.Enqueue(job=JobSpec(kind="noop")), peer, 1)
    await requests.answer(c.EnqueueBatch(jobs=[JobSpec(kind="noop")]), peer, 2)
    records = [r for r in caplog.records if getattr(r, "event", None) == "control.request"]
    assert [(r.command, r.levelno) for r in records] == [
        ("enqueue", logging.DEBUG), ("enqueue_batch", logging.DEBUG)]


async def test_a_refusal_is_an_error_envelope_and_a_bug_reaches_the_transport() -> None:
    requests = Requests(Answering(), "http")
    reply = await requests.answer(c.Get(job_id=9), Peer("over HTTP from 10.0.0.1"), 5)
    assert reply == c.Error(id=5, code="not_found", message="no job 9", details={"id": 9})
    hello = await requests.answer(c.Hello(protocol=1), Peer("x"))
    assert isinstance(hello, c.Ok) and hello.result.server == "test"
    with pytest.raises(RuntimeError):
        await requests.answer(c.Nodes(), Peer("x"))
