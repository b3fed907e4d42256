"""Clients that hang up, stop reading, send too much or too deep: jobd stays up.

Every test here runs against the real daemon and ends by checking that the same process
still answers `ping` (item 1 of issue 14: one client must never stop jobd).
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Limits
from tests.support import ROOT, JobdProcess, Sql, wait_until

HELLO = {"type": "hello", "protocol": 1, "client": "test_hangups"}
FRAME_CAP = Limits().max_frame_bytes


@pytest.fixture(scope="module")
def daemon_db(pg_cluster) -> Iterator[str]:
    from tests.conftest import scratch_database

    with scratch_database(pg_cluster, "jobd_hang") as url:
        yield url


@pytest.fixture(scope="module")
def daemon(daemon_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobdProcess]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = JobdProcess(tmp_path_factory.mktemp("hang"), daemon_db,
                       control={"http": f"127.0.0.1:{port}"})
    proc.http_port = port  # type: ignore[attr-defined]
    try:
        proc.start()
        yield proc
    finally:
        proc.kill()


def connect(daemon: JobdProcess, timeout: float = 30.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(daemon.socket))
    return s


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def read_line(s: socket.socket, buffer: bytearray) -> bytes | None:
    while b"\n" not in buffer:
        chunk = s.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    end = buffer.index(b"\n")
    out = bytes(buffer[:end])
    del buffer[:end + 1]
    return out


def assert_alive(daemon: JobdProcess) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_text()[-4000:]
    s = connect(daemon, timeout=10)
    try:
        buf = bytearray()
        s.sendall(line({"id": 1, **HELLO}) + line({"id": 2, "type": "ping"}))
        replies = [json.loads(read_line(s, buf) or b"null") for _ in range(2)]
        assert replies[1]["type"] == "ok" and replies[1]["id"] == 2, replies
    finally:
        s.close()
    assert "stopped on an error" not in daemon.log_text()
    # A hang-up is logged once, as a drop, never as a crashed request.
    crashed = [e for e in daemon.log_events() if e.get("event") == "control.crashed"]
    assert not crashed, crashed[:1]


def start_long_job(daemon: JobdProcess) -> int:
    return int(daemon.jobctl("enqueue", "sleep", "--args",
                             '{"seconds": 30, "steps": 300}').stdout)


def dropped(daemon: JobdProcess) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event") == "control.dropped"]


# --------------------------------------------------------------------------- item 1


def test_hello_and_fifty_lists_then_close_at_once(daemon: JobdProcess) -> None:
    for _ in range(20):
        s = connect(daemon)
        s.sendall(line({"id": 1, **HELLO})
                  + b"".join(line({"id": i, "type": "list", "limit": 1000}) for i in range(2, 52)))
        s.close()
    # Some of those replies hit a closed peer; wait for the daemon to have seen that.
    wait_until(lambda: dropped(daemon), "a logged drop", daemons=(daemon,))
    assert_alive(daemon)
    assert {e.get("reason") for e in dropped(daemon)} <= {"hung_up"}


def test_close_before_reading_replies_with_reset(daemon: JobdProcess) -> None:
    # SO_LINGER 0: the close is a reset, the harshest hang-up a peer can do.
    for _ in range(10):
        s = connect(daemon)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.sendall(line({"id": 1, **HELLO})
                  + b"".join(line({"id": i, "type": "stats"}) for i in range(2, 40)))
        s.close()
    assert_alive(daemon)


def test_watch_not_read_then_closed(daemon: JobdProcess) -> None:
    job_id = start_long_job(daemon)
    socks = []
    for _ in range(5):
        s = connect(daemon)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(line({"id": 1, **HELLO})
                  + line({"id": 2, "type": "watch", "job_id": job_id, "interval_s": 0.01}))
        socks.append(s)
    # Never read: the daemon writes progress frames into a full buffer, then we hang up.
    wait_until(lambda: daemon.jobctl_json("get", str(job_id)).get("progress"),
               "progress", daemons=(daemon,))
    before = len(dropped(daemon))
    for s in socks:
        s.close()
    wait_until(lambda: len(dropped(daemon)) >= before + len(socks), "the drops",
               daemons=(daemon,))
    assert_alive(daemon)
    daemon.jobctl("cancel", str(job_id))


def _jobctl_watch(daemon: JobdProcess, job_id: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.jobctl", "--socket", str(daemon.socket), "watch",
         str(job_id)], cwd=ROOT, env=daemon.env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith(f"job {job_id} "), first
    return proc


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM],
                         ids=["ctrl-c", "timeout"])
def test_jobctl_watch_interrupted(daemon: JobdProcess, signum: int) -> None:
    job_id = start_long_job(daemon)
    for _ in range(3):
        before = len(dropped(daemon))
        proc = _jobctl_watch(daemon, job_id)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
        if signum == signal.SIGINT:
            # Ctrl-C is how one stops watching: no traceback, the shell's 130.
            assert "Traceback" not in err, err
            assert proc.returncode == 130, (proc.returncode, err)
        # The watch's next frame finds the peer gone.
        wait_until(lambda n=before: len(dropped(daemon)) > n, "the drop", daemons=(daemon,))
    assert_alive(daemon)
    daemon.jobctl("cancel", str(job_id))


def test_timeout_command_on_jobctl_watch(daemon: JobdProcess) -> None:
    job_id = start_long_job(daemon)
    before = len(dropped(daemon))
    result = subprocess.run(
        ["timeout", "2", sys.executable, "-m", "daemon.jobctl", "--socket",
         str(daemon.socket), "watch", str(job_id)],
        cwd=ROOT, env=daemon.env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 124, result
    wait_until(lambda: len(dropped(daemon)) > before, "the drop", daemons=(daemon,))
    assert_alive(daemon)
    daemon.jobctl("cancel", str(job_id))


# --------------------------------------------------------------------------- item 3


def test_oversized_args_via_jobctl_show_frame_too_long(daemon: JobdProcess,
                                                       tmp_path: Path) -> None:
    args_file = tmp_path / "big.jsonl"
    args_file.write_text(json.dumps({"blob": "x" * (3 << 20)}) + "\n")
    result = daemon.jobctl("enqueue", "noop", "--args-file", str(args_file), check=False)
    assert result.returncode == 1, result
    assert result.stderr.startswith("jobctl: frame_too_long: "), result.stderr
    assert str(FRAME_CAP) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    result = daemon.jobctl("--json", "enqueue", "noop", "--args-file", str(args_file),
                           check=False)
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "frame_too_long" and error["details"]["limit"] == FRAME_CAP
    assert_alive(daemon)


def test_oversized_line_reply_reaches_a_raw_client_still_sending(daemon: JobdProcess) -> None:
    # The daemon answers while we are still sending 3 MiB; it must read on so that our
    # send completes and its reply is there to read.
    s = connect(daemon)
    buf = bytearray()
    s.sendall(line({"id": 1, **HELLO}))
    assert json.loads(read_line(s, buf) or b"null")["type"] == "ok"
    s.sendall(b'{"id": 2, "type": "ping", "pad": "' + b"x" * (3 << 20) + b'"}\n')
    reply = json.loads(read_line(s, buf) or b"null")
    assert reply["code"] == "frame_too_long" and reply["details"] == {"limit": FRAME_CAP}
    assert read_line(s, buf) is None
    s.close()
    assert_alive(daemon)


def test_connection_limit_error_reaches_jobctl(jobd) -> None:
    daemon = jobd(control={"max_connections": 4})
    held = [connect(daemon) for _ in range(4)]
    try:
        wait_until(lambda: b"too_many_connections" in _try_extra(daemon),
                   "the limit to be reached", daemons=(daemon,))
        result = daemon.jobctl("ping", check=False)
        assert result.returncode == 1, result
        assert result.stderr.startswith("jobctl: too_many_connections: "), result.stderr
        result = daemon.jobctl("--json", "ping", check=False)
        assert json.loads(result.stdout)["error"]["code"] == "too_many_connections"
    finally:
        for s in held:
            s.close()
    wait_until(lambda: daemon.jobctl("ping", check=False).returncode == 0, "a free slot",
               daemons=(daemon,))
    assert_alive(daemon)


def _try_extra(daemon: JobdProcess) -> bytes:
    s = connect(daemon, timeout=10)
    try:
        return s.recv(4096)
    except TimeoutError:
        return b""
    finally:
        s.close()


# --------------------------------------------------------------------------- item 2


def test_get_and_list_of_a_big_stored_result(daemon: JobdProcess, daemon_db: str) -> None:
    job_id = int(daemon.jobctl("enqueue", "noop").stdout)
    wait_until(lambda: daemon.jobctl_json("get", str(job_id))["state"] == "completed",
               "the job to complete", daemons=(daemon,))
    big = {"html": "<p>" + "y" * (2_500_000) + "</p>"}
    Sql(daemon_db).execute("UPDATE jobd.jobs SET result = $1::jsonb WHERE id = $2",
                           json.dumps(big), job_id)
    result = daemon.jobctl("get", str(job_id), check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "y" * 1000 in result.stdout
    assert daemon.jobctl_json("get", str(job_id))["result"] == big
    result = daemon.jobctl("list", check=False)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert str(job_id) in result.stdout
    assert_alive(daemon)


# --------------------------------------------------------------------------- item 13 (socket)


@pytest.mark.parametrize("payload", [b"[" * 100_000, b'{"type": "ping", "x": ' + b"[" * 100_000,
                                     b'{"id": 3, "type": "enqueue", "job": {"kind": "noop", '
                                     b'"args": {"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}}"])
def test_deeply_nested_json_is_bad_json(daemon: JobdProcess, payload: bytes) -> None:
    s = connect(daemon)
    buf = bytearray()
    try:
        s.sendall(line({"id": 1, **HELLO}))
        assert json.loads(read_line(s, buf) or b"null")["type"] == "ok"
        s.sendall(payload + b"\n")
        reply = json.loads(read_line(s, buf) or b"null")
        assert reply["type"] == "error" and reply["code"] in ("bad_json", "bad_request"), reply
        s.sendall(line({"id": 9, "type": "ping"}))
        assert json.loads(read_line(s, buf) or b"null")["id"] == 9
    finally:
        s.close()
    assert_alive(daemon)


# --------------------------------------------------------------------------- item 21


def test_hello_then_idle_past_the_handshake_timeout(daemon: JobdProcess) -> None:
    # The handshake deadline (10 s) must stop applying once hello has been answered.
    s = connect(daemon, timeout=30)
    buf = bytearray()
    try:
        s.sendall(line({"id": 1, **HELLO}))
        assert json.loads(read_line(s, buf) or b"null")["type"] == "ok"
        readable, _, _ = select.select([s], [], [], 11.0)
        assert not readable, read_line(s, buf)
        s.sendall(line({"id": 2, "type": "ping"}))
        reply = json.loads(read_line(s, buf) or b"null")
        assert reply["type"] == "ok" and reply["id"] == 2, reply
    finally:
        s.close()


# --------------------------------------------------------------------------- accept


def test_accept_out_of_descriptors_is_survived(daemon: JobdProcess) -> None:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    # No descriptor left: the daemon's accept() fails with EMFILE while we wait. Below
    # the count in use, so one the daemon closes meanwhile (a pooled connection) does
    # not make room for the accept.
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (max(3, in_use - 8), before[1]))
    try:
        s = connect(daemon, timeout=30)
        s.sendall(line({"id": 1, **HELLO}) + line({"id": 2, "type": "ping"}))
        wait_until(lambda: any(e.get("event") == "control.accept_failed"
                               for e in daemon.log_events()),
                   "accept to fail", daemons=(daemon,))
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, before)
    buf = bytearray()
    replies = [json.loads(read_line(s, buf) or b"null") for _ in range(2)]
    s.close()
    assert replies[1]["type"] == "ok" and replies[1]["id"] == 2, replies
    assert_alive(daemon)


def test_drops_are_counted(daemon: JobdProcess) -> None:
    import urllib.request

    # Runs after the hang-up tests above: their drops are in the counter.
    url = f"http://127.0.0.1:{daemon.http_port}/metrics"  # type: ignore[attr-defined]
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'jobd_control_connections_dropped_total{reason="hung_up"}' in body
    assert 'jobd_control_connections_dropped_total{reason="frame_too_long"}' in body
    assert 'jobd_control_connections_dropped_total{reason="accept_failed"}' in body
