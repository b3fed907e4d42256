"""HTTP hang-ups, slow clients and floods against one real `jobd run`.

Schemathesis (test_http_schemathesis.py) sends well-formed HTTP with generated bodies;
this test is about the connections themselves. A seeded random sequence of client
behaviours runs against one daemon with a small connection cap and short timeouts:

- hang-ups right after the request head, in the middle of the body, in the middle of
  a large `list` response, after pipelining requests without reading a reply, and by
  reset (SO_LINGER 0);
- slowloris clients holding half a request head or half a body, and clients that
  request a large response and never read it;
- connection floods past the cap; garbage bytes, an HTTP/2 preface, a body declared
  larger than the frame cap, 100,000 nested brackets;
- and ordinary requests between them, which must be answered (a 503 only while the
  cap is reached).

Afterwards the daemon process is alive, `/healthz` and `/readyz` answer, `ping` over the
socket answers, every seeded job is exactly as it was, a new job completes, and no
request ended in `internal`. Fixed seed (JOBD_FUZZ_SEED, default 14); the number of
behaviours is JOBD_FUZZ_EXAMPLES (default 150).
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import time
from collections.abc import Callable

from tests.e2e.test_http_e2e import TOKEN, free_port, request, wait_for
from tests.e2e.test_http_schemathesis import enqueue, job_view, seed_jobs

EXAMPLES = int(os.environ.get("JOBD_FUZZ_EXAMPLES", "150"))
SEED = int(os.environ.get("JOBD_FUZZ_SEED", "14"))
CAP = 24  # control.http_max_connections for this daemon
HELD_MAX = 40  # slow clients kept open at once (more than the cap, on purpose)
FRAME = 2 * 1024 * 1024  # limits.max_frame_bytes' default


def auth_head(method: str, path: str, length: int | None = None, extra: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: jobd", f"Authorization: Bearer {TOKEN}"]
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return auth_head("POST", path, len(body), extra) + body


class Client:
    """The harness's side: raw sockets to one daemon, the slow ones kept in `held`."""

    def __init__(self, port: int, rng: random.Random):
        self.port = port
        self.rng = rng
        self.held: list[socket.socket] = []
        self.counts: dict[str, int] = {}
        self.answers: dict[int, int] = {}
        self.slowest: list[tuple[float, str]] = []  # the 5 longest behaviours, for the log

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def hold(self, sock: socket.socket) -> None:
        self.held.append(sock)
        while len(self.held) > HELD_MAX:
            self.held.pop(self.rng.randrange(len(self.held))).close()

    def release_all(self) -> None:
        for sock in self.held:
            sock.close()
        self.held.clear()

    @staticmethod
    def reset(sock: socket.socket) -> None:
        """Close with a RST instead of a FIN."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    @staticmethod
    def reply(sock: socket.socket) -> bytes:
        """Read one whole response (Content-Length framed) or until the server closes."""
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return data
            if not chunk:
                return data
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length" and \
                            len(body) >= int(value.strip()):
                        return data

    def status_of(self, data: bytes) -> int:
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
        self.answers[status] = self.answers.get(status, 0) + 1
        return status

    # -- behaviours ------------------------------------------------------------------

    def hangup_after_head(self) -> None:
        sock = self.connect()
        sock.sendall(auth_head("POST", "/v1/enqueue", length=self.rng.randrange(10, 5000)))
        sock.close()

    def hangup_mid_body(self) -> None:
        body = json.dumps({"job": {"kind": "noop", "args": {"pad": "x" * 3000}}}).encode()
        sock = self.connect()
        sock.sendall(post("/v1/enqueue", body)[: -self.rng.randrange(1, len(body))])
        (self.reset if self.rng.random() < 0.5 else socket.socket.close)(sock)

    def hangup_mid_response(self) -> None:
        sock = self.connect()
        sock.sendall(post("/v1/list", b'{"limit": 1000}'))
        sock.recv(self.rng.choice([1, 100, 4096]))
        (self.reset if self.rng.random() < 0.5 else socket.socket.close)(sock)

    def pipelined_then_gone(self) -> None:
        sock = self.connect()
        requests = [post("/v1/list", b'{"limit": 200}'), auth_head("GET", "/healthz"),
                    post("/v1/ping", b"{}"), auth_head("GET", "/metrics")]
        sock.sendall(b"".join(self.rng.choice(requests) for _ in range(self.rng.randrange(2, 30))))
        (self.reset if self.rng.random() < 0.5 else socket.socket.close)(sock)

    def slow_head(self) -> None:
        sock = self.connect()
        sock.sendall(auth_head("GET", "/healthz")[: self.rng.randrange(1, 30)])
        self.hold(sock)

    def slow_body(self) -> None:
        sock = self.connect()
        sock.sendall(auth_head("POST", "/v1/enqueue", length=1000) + b'{"job": {"ki')
        self.hold(sock)

    def never_reads_response(self) -> None:
        # Pipelined large lists: more than the kernel's buffers hold, so the server's
        # write blocks until control.http_write_timeout cuts the connection.
        sock = socket.socket()
        sock.settimeout(10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", self.port))
        sock.sendall(post("/v1/list", b'{"limit": 1000}') * 12)
        self.hold(sock)

    def flood(self) -> None:
        socks = []
        for _ in range(CAP + self.rng.randrange(1, 20)):
            try:
                socks.append(self.connect(timeout=2))
            except OSError:
                break
        for sock in socks:
            (self.reset if self.rng.random() < 0.3 else socket.socket.close)(sock)

    def garbage(self) -> None:
        sock = self.connect(timeout=5)
        sock.sendall(self.rng.choice([
            self.rng.randbytes(self.rng.randrange(1, 3000)),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + self.rng.randbytes(50),
            b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n",
            b"POST /v1/ping HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
            b"POST /v1/ping HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ]))
        if self.rng.random() < 0.5:
            self.status_of(self.reply(sock))
        sock.close()

    def oversized(self) -> None:
        sock = self.connect()
        sock.sendall(auth_head("POST", "/v1/enqueue", length=FRAME + self.rng.randrange(1, 10**6)))
        assert self.status_of(self.reply(sock)) in {413, 503}
        sock.close()

    def deeply_nested(self) -> None:
        depth = self.rng.choice([1000, 100_000])
        body = b'{"job": {"kind": "noop", "args": {"a": ' + b"[" * depth + b"]" * depth + b"}}}"
        sock = self.connect()
        sock.sendall(post("/v1/enqueue", body))
        data = self.reply(sock)
        status = self.status_of(data)
        assert status in {200, 400, 422, 503}, data[:500]
        sock.close()

    def ordinary(self) -> None:
        sock = self.connect()
        sock.sendall(self.rng.choice([post("/v1/ping", b"{}"), auth_head("GET", "/healthz"),
                                      post("/v1/list", b'{"limit": 5}')]))
        data = self.reply(sock)
        assert self.status_of(data) in {200, 503}, data[:500]
        sock.close()

    def behaviours(self) -> list[tuple[Callable[[], None], int]]:
        return [(self.hangup_after_head, 3), (self.hangup_mid_body, 3),
                (self.hangup_mid_response, 3), (self.pipelined_then_gone, 2),
                (self.slow_head, 2), (self.slow_body, 2), (self.never_reads_response, 1),
                (self.flood, 1), (self.garbage, 2), (self.oversized, 1),
                (self.deeply_nested, 1), (self.ordinary, 4)]

    def step(self) -> None:
        actions, weights = zip(*self.behaviours(), strict=True)
        action = self.rng.choices(actions, weights)[0]
        name = action.__name__
        began = time.monotonic()
        try:
            action()
        except (ConnectionResetError, BrokenPipeError, ConnectionRefusedError):
            name += " (reset by the server)"  # a closed connection is a fine answer
        self.counts[name] = self.counts.get(name, 0) + 1
        self.slowest = sorted([*self.slowest, (round(time.monotonic() - began, 2), name)])[-5:]


def metric(base: str, name: str, labels: str) -> float:
    text = request(base, "GET", "/metrics", token=None)[2].decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_hangups_slow_clients_and_floods_leave_daemon_and_jobs_intact(jobd, tmp_path):
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    daemon = jobd(control={"http": f"127.0.0.1:{port}", "token_file": str(token_file),
                           "http_max_connections": CAP, "http_read_timeout": "1s",
                           "http_write_timeout": "1s", "http_keep_alive": "1s"},
                  queues={"default": {"concurrency": 5}, "final": {"concurrency": 1}})
    base = f"http://127.0.0.1:{port}"
    seeded = seed_jobs(base)
    # Enough stored data that a list is a response the kernel cannot buffer at once.
    # (args are strict, so the padding rides in tags.)
    batch = [{"kind": "noop", "delay_s": 3600,
              "tags": ["seed", *(f"{i}" + "p" * 250 for i in range(12))]}
             for _ in range(150)]
    status, _, body = request(base, "POST", "/v1/enqueue_batch", {"jobs": batch})
    assert status == 200, body
    seeded.update({i: job_view(base, i) for i in json.loads(body)["result"]["ids"]})

    client = Client(port, random.Random(SEED))
    started = time.monotonic()
    try:
        for _ in range(EXAMPLES):
            client.step()
            assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_text()[-5000:]
    finally:
        client.release_all()
    fuzz_s = time.monotonic() - started

    wait_for(lambda: request(base, "GET", "/healthz", token=None)[0] == 200, "/healthz")
    assert request(base, "GET", "/readyz", token=None)[0] == 200
    assert json.loads(daemon.jobctl("--json", "ping").stdout)["ready"] is True
    for job_id, before in seeded.items():
        assert job_view(base, job_id) == before, f"seeded job {job_id} changed"
    job_id = enqueue(base, {"kind": "noop", "queue": "final"})
    wait_for(lambda: job_view(base, job_id)["state"] == "completed", "a new job to complete")
    assert metric(base, "jobd_http_errors_total", 'reason="internal"') == 0
    crashed = [e for e in daemon.log_events() if e.get("event") == "http.crashed"]
    assert not crashed, crashed[:3]
    assert daemon.proc is not None and daemon.proc.poll() is None
    cut = {reason: metric(base, "jobd_http_errors_total", f'reason="{reason}"') for reason in
           ("connection_limit", "read_timeout", "write_timeout", "too_large", "accept_error")}
    print(f"HTTP hang-ups: {EXAMPLES} behaviours (seed {SEED}) in {fuzz_s:.1f}s: "
          f"{dict(sorted(client.counts.items()))}; answers {dict(sorted(client.answers.items()))};"
          f" daemon counted {cut}; slowest {client.slowest}")
