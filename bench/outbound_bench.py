"""What one request through actors/services/outbound.py costs the sending process:
N signed POSTs to a loopback receiver in another process (http.server, keep-alive),
C at a time; prints requests/s and the sender's CPU per request.

    python bench/outbound_bench.py [--requests 3000] [--concurrency 1 10 100]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actors.services.outbound import Outbound  # noqa: E402
from protocol.webhook_signing import sign_headers  # noqa: E402

RECEIVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
class S(ThreadingHTTPServer):
    request_queue_size = 512
    daemon_threads = True
S(("127.0.0.1", int(sys.argv[1])), Ok).serve_forever()
"""


async def run(url: str, n: int, c: int) -> None:
    out = Outbound(allow_hosts=["127.0.0.1"])
    body = b'{"type": "job.completed", "data": {"id": 1, "kind": "noop"}}'
    limit = trio.CapacityLimiter(c)

    async def one(i: int) -> None:
        async with limit:
            await out.post(url, body, sign_headers([b"key"], f"msg_{i}", body), 10)

    t0, cpu0 = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(f"concurrency {c:4d}: {n / wall:6.0f} requests/s, sender CPU {cpu / n * 1e6:5.0f} us/request")
    await out.aclose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 100])
    args = ap.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    try:
        time.sleep(1.0)
        for c in args.concurrency:
            trio.run(run, f"http://127.0.0.1:{port}/hook", args.requests, c)
    finally:
        receiver.kill()


if __name__ == "__main__":
    main()
