"""End-to-end jobs/s with completion webhooks off and on (bench/jobd_bench.py's e2e:
`noop` jobs inserted while the queue is paused, then resumed and drained), alternating
rounds of three configs:

- off: no [[webhooks]] (the finish trigger is disabled: the hot path as before 0017);
- idle: one webhook whose kinds match nothing (the trigger runs, writes no row);
- on: one webhook for every finish, to a receiver on loopback answering 200; the
  delivery rate: a fresh daemon, once ready, drains the rows the run left pending
  (rows pending at ready / seconds until none is).

    python bench/webhook_e2e_bench.py [--jobs 20000] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import jobd_bench as jb  # noqa: E402
from tests.support import JobdProcess  # noqa: E402


class Server(ThreadingHTTPServer):
    request_queue_size = 512  # the default 5 resets connections under load
    daemon_threads = True


class Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()


def webhook_toml(url: str, secret: Path, kinds: list[str] | None) -> str:
    return ('[http]\nallow_hosts = ["127.0.0.1"]\n[[webhooks]]\nname = "bench"\n'
            f'url = "{url}"\nsecret_file = "{secret}"\n'
            + (f"kinds = {json.dumps(kinds)}\n" if kinds is not None else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    server = Server(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    with jb.scratch("jobd-wh-") as ctx:
        secret = ctx.workdir / "secret"
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        secret.write_text("bench-secret\n")
        plain = ctx.daemon
        configs = {"off": "", "idle": webhook_toml(url, secret, ["nothing"]),
                   "on": webhook_toml(url, secret, None)}
        for _ in range(args.reps):
            for name, extra in configs.items():
                def daemon(extra_queue=None, retention=None, jobs=None, _extra=extra):
                    d = plain(extra_queue=extra_queue, retention=retention, jobs=jobs)
                    return JobdProcess(d.directory, ctx.url, modules=jb.MODULES,
                                       queues={"default": {"concurrency": 200,
                                                           **(extra_queue or {})}},
                                       jobs=jobs, extra_toml=_extra)
                ctx.daemon = daemon  # type: ignore[method-assign]
                ctx.sql.execute("TRUNCATE jobd.webhook_outbox")
                r = jb.e2e(ctx, args.jobs)
                out = {k: round(v, 3) for k, v in r.items()}
                if name == "on":
                    out["outbox_rows"] = ctx.sql.fetchval("SELECT count(*) FROM jobd.webhook_outbox")
                    d = ctx.daemon()
                    d.start()
                    t0 = time.perf_counter()
                    left = ctx.sql.fetchval("SELECT count(*) FROM jobd.webhook_outbox"
                                            " WHERE state = 'pending'")
                    while ctx.sql.fetchval("SELECT count(*) FROM jobd.webhook_outbox"
                                           " WHERE state = 'pending'"):
                        time.sleep(0.1)
                    out["deliveries_per_s"] = round(left / (time.perf_counter() - t0))
                    jb.stop([d])
                print(name, out, flush=True)
    server.shutdown()


if __name__ == "__main__":
    main()
