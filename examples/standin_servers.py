"""Stand-ins for the remote APIs the examples call: an LLM API and a marketplace API.

Deterministic (answers are a hash of the request), on loopback, stdlib only, in a thread.
Switches, set with `POST /_control` (JSON) or `StandinServers.configure(...)`:

    rate_limit_next  answer the next N requests with 429 + Retry-After: retry_after
    fail_next        answer the next N requests with 503
    slow_s           sleep this long before every answer
    judge_rejects    the judge rejects the first N drafts of each subject
    fail_models      models whose every call answers 500
    hook_secret      the signing secret of jobd's HTTP kind `report.summarize`, which
                     `POST /v1/hooks/summarize` serves (a jobd HTTP handler, README
                     "Handlers behind a URL"): unsigned requests get 401; `args.long`
                     answers 202 and finishes the job later through its callbacks

Run alone: `python -m examples.standin_servers` prints the URL and serves until Ctrl-C.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib import error, request

from examples.webhook_verify import InvalidSignature, verify

DEFAULTS: dict[str, Any] = {"rate_limit_next": 0, "retry_after": 1, "fail_next": 0,
                            "slow_s": 0.0, "judge_rejects": 0, "fail_models": [],
                            "hook_secret": ""}


def digest(*parts: Any) -> int:
    return int(hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:8], 16)


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.switches = dict(DEFAULTS)
        self.counts: dict[str, int] = {}
        self.judged: dict[str, int] = {}
        self.refunds: list[dict[str, Any]] = []

    def take(self, name: str) -> bool:
        with self.lock:
            if self.switches[name] > 0:
                self.switches[name] -= 1
                return True
            return False


class _Handler(BaseHTTPRequestHandler):
    state: State
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    def do_GET(self) -> None:  # noqa: N802
        self._route("GET", {})

    def do_POST(self) -> None:  # noqa: N802
        if self.path == "/v1/hooks/summarize":
            self._summarize()
            return
        self._route("POST", self._body())

    def _summarize(self) -> None:
        """An app's endpoint for jobd's HTTP kind: verify, then answer or call back."""
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            verify(self.state.switches["hook_secret"],
                   {k.lower(): v for k, v in self.headers.items()}, raw)
        except InvalidSignature as exc:
            self._reply(401, {"error": str(exc)})
            return
        job = json.loads(raw)
        text = " ".join(str(v) for v in job["args"].values())
        summary = {"summary": f"{text[:60]} #{digest(text) % 1000}", "attempt": job["attempt"]}
        if not job["args"].get("long"):
            self._reply(200, summary)
            return
        self._reply(202, {"callback": True})
        threading.Thread(target=_finish_later, args=(job["callback"], summary),
                         daemon=True).start()

    def _route(self, method: str, body: dict[str, Any]) -> None:
        s = self.state
        path, _, query = self.path.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        if path == "/_control":
            with s.lock:
                s.switches.update(body)
                self._reply(200, {"switches": s.switches, "counts": s.counts,
                                  "refunds": s.refunds})
            return
        with s.lock:
            s.counts[path] = s.counts.get(path, 0) + 1
            slow = s.switches["slow_s"]
        if slow:
            time.sleep(slow)
        if s.take("rate_limit_next"):
            self._reply(429, {"error": "rate limited"},
                        {"Retry-After": str(s.switches["retry_after"])})
            return
        if s.take("fail_next"):
            self._reply(503, {"error": "try again"})
            return
        if path == "/v1/complete":
            model = body.get("model", "m1")
            if model in s.switches["fail_models"]:
                self._reply(500, {"error": f"{model} is down"})
                return
            h = digest(model, body.get("prompt"), body.get("variation", 0))
            self._reply(200, {"model": model, "text": f"{body.get('prompt', '')[:40]}#{h % 10000}",
                              "score": h % 100})
        elif path == "/v1/judge":
            subject = body.get("subject", "")
            with s.lock:
                seen = s.judged.get(subject, 0)
                s.judged[subject] = seen + 1
                approved = seen >= s.switches["judge_rejects"]
            self._reply(200, {"approved": approved,
                              "feedback": "ok" if approved else f"too vague (round {seen + 1})"})
        elif path == "/v1/credits/refund":
            with s.lock:
                s.refunds.append(body)
            self._reply(200, {"refunded": body.get("credits", 0)})
        elif path == "/v1/listings":
            market, page = params.get("marketplace", "m"), int(params.get("page", "0"))
            per_page, pages = 10, 3
            items = [{"id": f"{market}-{page * per_page + i}",
                      "price": digest(market, page, i) % 500 + 1}
                     for i in range(per_page)] if page < pages else []
            self._reply(200, {"items": items, "next_page": page + 1 if page + 1 < pages else None})
        elif path == "/v1/enrich":
            self._reply(200, {"id": body.get("id"), "category": ["toys", "tools", "books"][
                digest(body.get("id")) % 3]})
        else:
            self._reply(404, {"error": f"no route {path}"})


def _finish_later(callback: dict[str, Any], summary: dict[str, Any]) -> None:
    """The long job's work, done after the 202: progress, then complete (jobd's HTTP API,
    authorized by the job's callback token alone)."""
    for pct, action in ((50, "progress"), (100, "complete")):
        time.sleep(0.5)
        body = ({"token": callback["token"], "pct": pct, "note": "summarizing"}
                if action == "progress" else {"token": callback["token"], "result": summary})
        req = request.Request(f"{callback['url']}/{action}", data=json.dumps(body).encode(),
                              headers={"Content-Type": "application/json"}, method="POST")
        with request.urlopen(req, timeout=10):
            pass


class StandinServers:
    """One loopback HTTP server for both APIs (the paths differ)."""

    def __init__(self, port: int = 0):
        self.state = State()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> StandinServers:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def configure(self, **switches: Any) -> None:
        with self.state.lock:
            self.state.switches.update(switches)

    def __enter__(self) -> StandinServers:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# -- the client side, used by the example handlers ------------------------------------------


class ApiError(Exception):
    """An HTTP error with what actors/retry.py classifies on: status_code and headers."""

    def __init__(self, status: int, headers: dict[str, str], body: str):
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status_code = status
        self.headers = {k.lower(): v for k, v in headers.items()}


def call(url: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """Blocking JSON call (run it in a thread); raises ApiError on a non-2xx answer."""
    data = None if body is None else json.dumps(body).encode()
    req = request.Request(url, data=data, headers={"Content-Type": "application/json"},
                          method="GET" if body is None else "POST")
    try:
        with request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except error.HTTPError as exc:
        raise ApiError(exc.code, dict(exc.headers), exc.read().decode(errors="replace")) from None


if __name__ == "__main__":
    with StandinServers(8765) as servers:
        print(f"stand-in servers on {servers.url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
