"""The HTTP surface's bounds on a real `jobd run`: connections over the cap and past the
descriptor limit, bodies that never arrive, idle keep-alives, bodies over the frame cap.

Each test looks at what the daemon does (answers, closes, keeps running), never at how
long it took: waits are generous upper bounds with the configured timeouts far below.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from tests.e2e.test_http_e2e import TOKEN, free_port, request
from tests.support import JobdProcess, wait_until

WAIT_S = 20.0


def http_daemon(jobd, tmp_path, **control: Any) -> JobdProcess:
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    proc = jobd(control={"http": f"127.0.0.1:{port}", "token_file": str(token_file), **control})
    proc.port = port
    proc.base = f"http://127.0.0.1:{port}"
    return proc


def connect(port: int, timeout: float = WAIT_S) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (socket timeout: WAIT_S)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def healthz_answers(base: str) -> bool:
    try:
        return request(base, "GET", "/healthz", token=None)[0] == 200
    except OSError:
        return False


def head(body: bytes | None, path: str = "/v1/enqueue", length: int | None = None,
         extra: str = "") -> bytes:
    size = length if length is not None else len(body or b"")
    return (f"POST {path} HTTP/1.1\r\nHost: jobd\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {size}\r\n{extra}\r\n"
            ).encode() + (body or b"")


def envelope(reply: bytes) -> tuple[int, dict[str, Any]]:
    status_line, _, rest = reply.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(body)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_flood_past_the_cap_and_the_descriptor_limit(fresh_database, tmp_path):
    """600 held connections against a daemon allowed 400 descriptors (soft 200 at start):
    the daemon raises its soft limit, keeps HTTP at half of it, answers the rest 503,
    and still answers ping over the socket; HTTP works again once they are closed."""
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    daemon = JobdProcess(tmp_path / "d", fresh_database, nofile=(200, 400), control={
        "http": f"127.0.0.1:{port}", "token_file": str(token_file),
        "http_max_connections": 1000, "http_keep_alive": "120s"})
    held: list[socket.socket] = []
    try:
        daemon.start()
        assert daemon.proc is not None
        base = f"http://127.0.0.1:{port}"
        status, _, body = request(base, "POST", "/v1/enqueue", {"job": {"kind": "noop",
                                                                         "delay_s": 3600}})
        seeded = json.loads(body)["result"]["id"]
        events = {e.get("event"): e for e in daemon.log_events()}
        assert events["daemon.nofile"]["nofile"] == 400
        assert "lowered to 200" in events["http.max_connections_lowered"]["msg"]

        for _ in range(600):
            held.append(connect(port))
        # HTTP holds at most half the descriptors (plus a few being refused), so the
        # control socket can still accept.
        assert fd_count(daemon.proc.pid) < 400
        assert json.loads(daemon.jobctl("--json", "ping").stdout)["ready"] is True
        # Those over the cap are closed at once: answered 503 first, unless too many are
        # being refused at the same moment (then just closed).
        surplus = [read_until_closed(sock) for sock in held[200:]]
        refused = [envelope(reply) for reply in surplus if reply]
        assert refused and len(refused) + surplus.count(b"") == 400
        for status, reply in refused:
            assert status == 503 and reply["code"] == "too_many_connections"
            assert reply["details"] == {"limit": 200}

        for sock in held:
            sock.close()
        held.clear()
        # Until the daemon has seen the 600 hang-ups it is still at its cap, so a new
        # connection may be refused (503) or closed at once (reset): both mean "not yet".
        wait_until(lambda: healthz_answers(base), "/healthz to answer again",
                   timeout=WAIT_S, daemons=(daemon,))
        status, _, body = request(base, "GET", f"/v1/jobs/{seeded}")
        assert status == 200 and json.loads(body)["result"]["state"] == "scheduled"
        counted = request(base, "GET", "/metrics", token=None)[2].decode()
        assert 'jobd_http_errors_total{reason="connection_limit"}' in counted
    finally:
        for sock in held:
            sock.close()
        daemon.kill()


def test_body_that_never_arrives_is_answered_408_and_closed(jobd, tmp_path):
    daemon = http_daemon(jobd, tmp_path, http_read_timeout="500ms")
    with connect(daemon.port) as sock:
        sock.sendall(head(b'{"job": {"kind": ', length=100))  # half the body, then nothing
        status, reply = envelope(read_until_closed(sock))
    assert status == 408 and reply["code"] == "bad_request"
    assert "control.http_read_timeout" in reply["message"]
    # A body dribbled a byte at a time is bounded as a whole, not per read.
    with connect(daemon.port) as sock:
        sock.sendall(head(None, length=1000))
        sock.settimeout(0.2)
        data = b""
        for _ in range(int(WAIT_S / 0.2)):
            try:
                sock.sendall(b" ")
                data += sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if data.endswith(b"}") or not data:
                break
    assert data.startswith(b"HTTP/1.1 408")
    assert request(daemon.base, "GET", "/healthz", token=None)[0] == 200


def test_idle_keep_alive_and_half_sent_headers_are_closed(jobd, tmp_path):
    daemon = http_daemon(jobd, tmp_path, http_keep_alive="500ms")
    with connect(daemon.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: jobd\r\n\r\n")
        data = read_until_closed(sock)  # the answer, then the close once idle
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'{"status":"ok"}')
    with connect(daemon.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: jo")  # slowloris: never finishes
        assert read_until_closed(sock) == b""
    assert request(daemon.base, "GET", "/healthz", token=None)[0] == 200


def test_body_over_the_frame_cap_is_413_frame_too_long(jobd, tmp_path):
    daemon = http_daemon(jobd, tmp_path)
    limit = 2 * 1024 * 1024  # limits.max_frame_bytes' default, the socket's line cap too
    with connect(daemon.port) as sock:
        sock.sendall(head(None, length=limit + 1))  # answered before the body is sent
        status, reply = envelope(read_until_closed(sock))
    assert status == 413 and reply["code"] == "frame_too_long"
    assert str(limit) in reply["message"] and reply["details"] == {"limit": limit}
    # Streamed without a length (chunked), it is cut at the limit as well.
    with connect(daemon.port) as sock:
        sock.sendall(b"POST /v1/enqueue HTTP/1.1\r\nHost: jobd\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"y" * 65536
        try:
            for _ in range(limit // len(chunk) + 2):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 413")
    assert request(daemon.base, "POST", "/v1/ping", {})[0] == 200
