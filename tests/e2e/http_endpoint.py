"""A loopback endpoint for HTTP handlers, run in the test process: each path answers one
way, every request is checked with the Python verifier users copy
(examples/webhook_verify.py) and recorded.

- `/ok`: 200 `{"echo": args}`.
- `/status`: `args.status` for the first `args.times` attempts (with `Retry-After:
  args.retry_after` when given), then 200.
- `/slow`: holds `args.hold_s` (recording the overlap per `args.market`), then 200.
- `/callback`: 202 `{"callback": true}`.
- `/big`: 200 with a body of `args.bytes` bytes.
- `/nul`: 200 with a result holding a NUL character; `/garbage`: 200 with HTML.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from examples.webhook_verify import InvalidSignature, verify

SECRET = "whsec_" + "c2VjcmV0LWZvci10aGUtdGVzdHMtMTIzNDU2Nzg5MA=="


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    verified: bool
    at: float


@dataclass
class Endpoint:
    server: ThreadingHTTPServer
    seen: list[Seen] = field(default_factory=list)
    running: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def requests(self, path: str | None = None) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if path is None or s.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start() -> Endpoint:
    endpoint: Endpoint

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                verify(SECRET, headers, raw)
                verified = True
            except InvalidSignature:
                verified = False
            body = json.loads(raw)
            with endpoint.lock:
                endpoint.seen.append(Seen(self.path, headers, body, verified, time.time()))
            args = body.get("args", {})
            if self.path == "/status" and body["attempt"] <= args.get("times", 1):
                extra = {"retry-after": str(args["retry_after"])} if "retry_after" in args else {}
                return self.answer(args["status"], {"error": "scripted"}, extra)
            if self.path == "/slow":
                market = args.get("market", "")
                with endpoint.lock:
                    endpoint.running[market] = endpoint.running.get(market, 0) + 1
                    endpoint.peak[market] = max(endpoint.peak.get(market, 0),
                                                endpoint.running[market])
                time.sleep(args.get("hold_s", 0.2))
                with endpoint.lock:
                    endpoint.running[market] -= 1
            if self.path == "/callback":
                return self.answer(202, {"callback": True})
            if self.path == "/big":
                return self.answer(200, "x" * args["bytes"])
            if self.path == "/nul":  # a result Postgres cannot store
                return self.answer(200, {"text": "a\u0000b"})
            if self.path == "/garbage":
                return self.answer(200, None, raw=b"<html>oops</html>")
            self.answer(200, {"echo": args, "attempt": body["attempt"]})

        def answer(self, status: int, value: Any, extra: dict[str, str] | None = None,
                   raw: bytes | None = None) -> None:
            payload = raw if raw is not None else json.dumps(value).encode()
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                for name, header in (extra or {}).items():
                    self.send_header(name, header)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # jobd gave up on the request (its timeout)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    endpoint = Endpoint(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return endpoint
