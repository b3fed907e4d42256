"""`jobd demo`: the examples on the embedded database, end to end, in one command.

Starts the stand-in APIs, a `jobd run` on a private state directory (embedded Postgres)
with the example handlers, enqueues a realistic mix (stock pipelines that need a human
approval, which the demo gives; interactive prediction sessions beside a nightly batch;
marketplace refreshes through a 429 storm; summaries by an HTTP handler, one of them a
long job finished through its callbacks), shows `jobctl top` until everything has
finished, then a summary and where to look next.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket as socket_module
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from daemon.jobctl.render import render_job, render_top
from examples.standin_servers import StandinServers
from protocol import JobSpec, SyncClient
from protocol import commands as c

MODULES = ["examples.stock_pipeline", "examples.predictions", "examples.marketplace"]
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket_module.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The HTTP kind the demo runs: its handler is the stand-in's endpoint (README "Handlers
# behind a URL"); a throwaway secret, written beside the config.
HOOK_SECRET = "whsec_ZGVtby1zZWNyZXQtb25seS1mb3ItdGhlLWRlbW8="


def _config(directory: Path, socket: Path, port: int, standin_url: str) -> Path:
    path = directory / "demo.toml"
    (directory / "summarize.secret").write_text(HOOK_SECRET + "\n")
    path.write_text(
        'region = "demo"\n[control]\n'
        f'socket = "{socket}"\nhttp = "127.0.0.1:{port}"\ntoken_file = "{directory / "api-token"}"\n'
        '[log]\nlevel = "warning"\n[handlers]\n'
        f"modules = {MODULES!r}\n".replace("'", '"')
        + '[jobs]\nreaper_interval = "0.5s"\npoll_interval = "0.5s"\nprogress_every_items = 5\n'
        '[queues.models]\nconcurrency = 8\n[queues.crawl]\nconcurrency = 4\n'
        f'[http]\nallow_hosts = ["127.0.0.1"]\ncallback_url = "http://127.0.0.1:{port}"\n'
        '[http.kinds."report.summarize"]\n'
        f'url = "{standin_url}/v1/hooks/summarize"\nqueue = "models"\nkey = "sector"\n'
        'timeout = "10s"\ncallback_timeout = "1m"\nsecret_file = "summarize.secret"\n')
    return path


def _mix() -> list[JobSpec]:
    jobs = [JobSpec(kind="stocks.pipeline", args={"sector": s, "tickers": t}) for s, t in (
        ("semiconductors", ["NVDA", "AMD", "INTC", "TSM", "ASML", "MU"]),
        ("energy", ["XOM", "CVX", "SHEL", "BP", "TTE", "COP"]))]
    jobs.append(JobSpec(kind="predict.nightly", args={
        "day": time.strftime("%Y-%m-%d"), "questions": [f"question {i}" for i in range(30)]}))
    jobs += [JobSpec(kind="predict.session", args={"user": f"user{i}", "question": f"q{i}?"})
             for i in range(5)]
    jobs.append(JobSpec(kind="predict.session", args={
        "user": "unlucky", "question": "?", "models": ["down-1"], "credits": 2}))
    jobs += [JobSpec(kind="market.refresh", args={"marketplace": m}) for m in ("ebay", "etsy", "amazon")]
    jobs += [JobSpec(kind="report.summarize", args={"sector": s, "long": long})
             for s, long in (("semiconductors", False), ("energy", False), ("retail", True))]
    return jobs


def run(state_dir: str | None = None, timeout_s: float = 300.0, stay: bool | None = None) -> int:
    """`stay`: keep the daemon (and its dashboard) up after the demo until Ctrl-C; by
    default when run from a terminal."""
    directory = Path(state_dir or tempfile.mkdtemp(prefix="jobd-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    if stay is None:
        stay = sys.stdin.isatty() and sys.stdout.isatty()
    # The dashboard's sign-in token (and the HTTP API's): a throwaway one per demo.
    token = secrets.token_urlsafe(18)
    (directory / "api-token").write_text(token + "\n")
    (directory / "api-token").chmod(0o600)
    socket = directory / "jobd.sock"
    log = directory / "jobd.log"
    with StandinServers() as servers:
        servers.configure(judge_rejects=2, rate_limit_next=8, retry_after=1,
                          fail_models=["down-1"], hook_secret=HOOK_SECRET)
        env = {**os.environ, "JOBD_STANDIN_URL": servers.url,
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env.pop("JOBD_DATABASE_URL", None)
        port = _free_port()
        print(f"jobd demo: state in {directory} (embedded Postgres), stand-in APIs on {servers.url}")
        print(f"metrics while it runs: http://127.0.0.1:{port}/metrics")
        dashboard = f"http://127.0.0.1:{port}/ui/"
        print(f"dashboard while it runs: {dashboard} (sign in with the token {token}, "
              f"also in {directory / 'api-token'})", flush=True)
        with log.open("ab") as out:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "daemon.main", "run", "--config",
                 str(_config(directory, socket, port, servers.url)), "--state-dir",
                 str(directory / "state")],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            client = SyncClient(str(socket), timeout=30)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if daemon.poll() is not None:
                    print(log.read_text()[-3000:], file=sys.stderr)
                    return 1
                try:
                    if client.call(c.Ping()).ready:
                        break
                except (OSError, Exception):  # noqa: BLE001 - not up yet
                    pass
                time.sleep(0.2)
            ids = client.call(c.EnqueueBatch(jobs=_mix())).ids
            approved: set[int] = set()
            last_line = ""
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                running = client.call(c.List(state=["running"], limit=20))
                frame = render_top(client.call(c.Stats()), running)
                if sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J" + frame + "\n")
                else:  # a log, not a screen: one line per change
                    line = _progress_line(client.call(c.Summary()))
                    if line != last_line:
                        print(line, flush=True)
                        last_line = line
                waiting = client.call(c.List(state=["waiting"], kind="stocks.pipeline", limit=50))
                for job in waiting.jobs:
                    view = client.call(c.Get(job_id=job.id))
                    if job.id not in approved and (view.waiting_on or {}).get("type") == "event":
                        client.call(c.SendEvent(name="subsector.approved",
                                                data={"id": job.id, "by": "demo"}))
                        approved.add(job.id)
                summary = client.call(c.Summary(ids=None, created_after=None))
                if summary.queued == 0 and summary.running == 0:
                    break
                time.sleep(1.0)
            summary = client.call(c.Summary())
            print(f"\nall done: {summary.completed} completed, {summary.failed} failed "
                  f"(the 'unlucky' session, refunded), {summary.cancelled} cancelled "
                  f"of {summary.total} jobs ({len(ids)} enqueued, the rest children and hooks)")
            print("\n" + render_job(client.call(c.Get(job_id=ids[0]))))
            print(f"\nrefunds the stand-in API received: {servers.state.refunds}")
            print("\nfrom /metrics:\n" + _finished_metrics(port))
            print(f"""
where to look next:
  the daemon's log (JSON lines):   {log}
  a daemon of your own:            jobd run --config examples/jobd.toml
  then, in another shell:          jobctl enqueue sleep --args '{{"seconds": 20}}'
                                   jobctl top        jobctl get 1        jobctl stats
  metrics:                         set control.http = "127.0.0.1:9464", then
                                   curl -s http://127.0.0.1:9464/metrics
  the handlers behind this demo:   examples/stock_pipeline.py, predictions.py, marketplace.py,
                                   and report.summarize: a URL (examples/standin_servers.py)
  how they work:                   README, "Durable workflows", "Flow control" and
                                   "Handlers behind a URL".""")
            if not stay:
                print("\n(jobd demo --stay keeps the daemon and its dashboard up afterwards)")
                return 0
            print(f"\nthe daemon stays up for a look: dashboard {dashboard}, token {token}, "
                  f"socket {socket} (JOBD_SOCKET={socket} jobctl top). Ctrl-C to stop.",
                  flush=True)
            signal.signal(signal.SIGTERM, _interrupt)
            try:
                while daemon.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
            return 0
        finally:
            daemon.terminate()
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _progress_line(summary: c.SummaryResult) -> str:
    return (f"{summary.completed} completed, {summary.running} running, "
            f"{summary.queued} queued or waiting, {summary.failed} failed")


def _finished_metrics(port: int) -> str:
    """The finished-jobs counters, as Prometheus would scrape them."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError as exc:
        return f"  (metrics unavailable: {exc})"
    lines = [ln for ln in text.splitlines() if ln.startswith("jobd_jobs_finished_total{")]
    calls = [ln for ln in text.splitlines() if ln.startswith("jobd_http_requests_total{")]
    return "\n".join("  " + ln for ln in sorted(lines)[:12] + sorted(calls))
