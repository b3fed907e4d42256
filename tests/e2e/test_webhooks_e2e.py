"""Completion webhooks against the real daemon and receivers on loopback.

Each receiver is an HTTP server in this process that records what it is sent and
answers as the test says (a status, a delay) or is not listening at all (down). The
receiver checks every request with protocol.webhook_signing.verify. No timing
assertions: every wait polls until a generous deadline.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from protocol.webhook_signing import InvalidSignature, verify
from tests.support import ROOT, JobdProcess, Sql, wait_until

SECRET = "whsec_" + "c2VjcmV0LWZvci10aGUtd2ViaG9vay10ZXN0cw=="
DEADLINE_S = 90.0


class Receiver:
    """A webhook endpoint on 127.0.0.1; `status`/`delay_s` say how it answers."""

    def __init__(self) -> None:
        with socket.socket() as probe:  # a free port, not yet listened on: "down"
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.status = 200
        self.delay_s = 0.0
        self.received: list[dict[str, Any]] = []  # verified requests, as they came
        self.bad_signatures = 0
        self.answered: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers["content-length"])
                body = self.rfile.read(length)
                if len(body) < length:
                    return  # the sender died mid-request (a SIGKILL test): no request
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    verify(SECRET, headers, body)
                    ok = True
                except InvalidSignature:
                    ok = False
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                status = receiver.status
                with receiver._lock:
                    if not ok:
                        receiver.bad_signatures += 1
                    elif 200 <= status < 300:
                        receiver.received.append(
                            {"id": headers["webhook-id"], "body": json.loads(body)})
                    receiver.answered[status] += 1
                try:
                    self.send_response(status if ok else 401)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the daemon gave up waiting (or was killed)

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def job_ids(self) -> Counter[int]:
        with self._lock:
            return Counter(r["body"]["data"]["id"] for r in self.received)

    def ids(self) -> list[str]:
        with self._lock:
            return [r["id"] for r in self.received]


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make() -> Receiver:
        made.append(Receiver())
        return made[-1]

    yield make
    for r in made:
        r.down()


def webhook_toml(name: str, receiver: Receiver, secret: Path, **options: Any) -> str:
    lines = ["[[webhooks]]", f'name = "{name}"', f'url = "{receiver.url}"',
             f'secret_file = "{secret}"', 'backoff = "0.2s"', 'max_backoff = "1s"']
    for key, value in options.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def config(tmp_path: Path, *hooks: str) -> str:
    secret = tmp_path / "webhook.secret"
    secret.write_text(SECRET + "\n")
    return '[http]\nallow_hosts = ["127.0.0.1"]\n' + "".join(hooks)


def secret_path(tmp_path: Path) -> Path:
    return tmp_path / "webhook.secret"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def api(port: int, command: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/{command}", data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer t0ken-for-the-api"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def outbox(sql: Sql) -> list[Any]:
    return sql.fetch("SELECT id, webhook, event, job_id, state, attempts, last_status,"
                     " last_error FROM jobd.webhook_outbox ORDER BY id")


def finished(sql: Sql, n: int) -> bool:
    return sql.fetchval("SELECT count(*) FROM jobd.jobs"
                        " WHERE state IN ('completed', 'failed', 'cancelled')") >= n


def test_receiver_down_then_up_signed_and_filtered(jobd, sql, tmp_path, receivers):
    everything, failures = receivers(), receivers()
    secret = secret_path(tmp_path)
    extra = config(tmp_path,
                   webhook_toml("everything", everything, secret),
                   webhook_toml("flaky-failures", failures, secret, events=["failed"],
                                kinds=["flaky"], queues=["default"]))
    d = jobd(extra_toml=extra)
    ids = [int(d.jobctl("enqueue", "noop").stdout) for _ in range(5)]
    fatal = int(d.jobctl("enqueue", "flaky", "--args", '{"failures": 1, "fatal": true}',
                         "--max-attempts", "1").stdout)
    later = int(d.jobctl("enqueue", "noop", "--delay", "1h").stdout)
    d.jobctl("cancel", str(later))
    wait_until(lambda: finished(sql, 7), "the jobs to finish", daemons=(d,))
    # Both receivers are down: the rows are pending and retried, never lost.
    wait_until(lambda: all(r["attempts"] >= 2 for r in outbox(sql)) and len(outbox(sql)) == 8,
               "retries against the down receivers", timeout=DEADLINE_S, daemons=(d,))
    rows = outbox(sql)
    assert {r["state"] for r in rows} == {"pending"}
    assert all(r["last_status"] is None and r["last_error"] for r in rows)
    listed = d.jobctl_json("webhooks", "list", "--state", "pending")["deliveries"]
    assert len(listed) == 8 and "url" not in listed[0]

    everything.up()
    failures.up()
    wait_until(lambda: {r["state"] for r in outbox(sql)} == {"delivered"},
               "every row delivered once the receivers are up", timeout=DEADLINE_S,
               daemons=(d,))
    assert everything.bad_signatures == failures.bad_signatures == 0
    assert set(everything.job_ids()) == {*ids, fatal, later}
    assert set(failures.job_ids()) == {fatal}  # the kind, queue and event filters
    types = {r["body"]["data"]["id"]: r["body"]["type"] for r in everything.received}
    assert types[fatal] == "job.failed" and types[later] == "job.cancelled"
    assert types[ids[0]] == "job.completed"
    failure = next(r["body"] for r in failures.received)
    assert failure["data"]["error"]["message"] and failure["data"]["kind"] == "flaky"
    # webhook-id is the outbox row's: one per (webhook, finish), the same on every retry.
    assert sorted(everything.ids() + failures.ids()) == sorted(
        f"msg_{r['id']}" for r in outbox(sql))


def test_sigkill_with_deliveries_pending_and_in_flight(jobd, sql, tmp_path, receivers):
    slow = receivers()
    slow.delay_s = 0.3
    slow.up()
    extra = config(tmp_path, webhook_toml("slow", slow, secret_path(tmp_path),
                                          timeout="2s", concurrency=4))
    options = {"extra_toml": extra, "jobs": {"retention.completed_max_count": 100_000}}
    d = jobd(**options)
    args = tmp_path / "args.jsonl"
    args.write_text("{}\n" * 300)
    ids = d.jobctl_json("enqueue", "noop", "--args-file", str(args))["ids"]
    wait_until(lambda: len(slow.received) >= 10 and sql.fetchval(
        "SELECT count(*) FROM jobd.webhook_outbox WHERE state = 'pending'"
        " AND claimed_by IS NOT NULL AND next_attempt_at > now()") > 0,
        "deliveries in flight", timeout=DEADLINE_S, daemons=(d,))
    d.kill()
    pending = sql.fetchval("SELECT count(*) FROM jobd.webhook_outbox WHERE state = 'pending'")
    assert pending > 0
    d.start()
    wait_until(lambda: finished(sql, len(ids)), "every job finished", daemons=(d,))
    wait_until(lambda: sql.fetchval(
        "SELECT count(*) FROM jobd.webhook_outbox WHERE state <> 'delivered'") == 0
        and sql.fetchval("SELECT count(*) FROM jobd.webhook_outbox") == len(ids),
        "every row delivered after the restart", timeout=3 * DEADLINE_S, daemons=(d,))
    got = slow.job_ids()
    assert set(got) == set(ids), "a finish was never delivered"
    assert slow.bad_signatures == 0


def test_errors_slow_receiver_window_runs_out_then_replay(jobd, sql, tmp_path, receivers):
    broken, slow = receivers(), receivers()
    broken.status = 500
    broken.up()
    slow.delay_s = 2.0
    slow.up()
    secret = secret_path(tmp_path)
    extra = config(tmp_path, webhook_toml("broken", broken, secret, retry_for="3s"),
                   webhook_toml("slow", slow, secret, retry_for="3s", timeout="0.5s"))
    port = free_port()
    token = tmp_path / "api-token"
    token.write_text("t0ken-for-the-api\n")
    d = jobd(extra_toml=extra, control={"http": f"127.0.0.1:{port}", "token_file": str(token)})
    job = int(d.jobctl("enqueue", "noop").stdout)
    wait_until(lambda: broken.answered[500] >= 2, "5xx answers", daemons=(d,))
    broken.status = 404  # a 4xx is retried too (a receiver mid-deploy answers 404)
    wait_until(lambda: {r["state"] for r in outbox(sql)} == {"failed"},
               "the retry window to run out", timeout=DEADLINE_S, daemons=(d,))
    rows = {r["webhook"]: r for r in outbox(sql)}
    assert rows["broken"]["last_status"] in (404, 500) and rows["broken"]["attempts"] >= 3
    assert rows["slow"]["last_status"] is None and "timeout" in rows["slow"]["last_error"]
    failed = d.jobctl_json("webhooks", "list", "--failed")["deliveries"]
    assert sorted(r["webhook"] for r in failed) == ["broken", "slow"]
    assert all(r["job_id"] == job for r in failed)
    human = d.jobctl("webhooks", "list", "--failed").stdout
    assert "broken" in human and "failed" in human

    broken.status, slow.delay_s = 200, 0.0
    replay = d.jobctl_json("webhooks", "replay", "--failed")
    assert sorted(replay["replayed"]) == sorted(r["id"] for r in failed)
    wait_until(lambda: {r["state"] for r in outbox(sql)} == {"delivered"},
               "the replayed rows delivered", daemons=(d,))
    assert broken.job_ids() == Counter({job: 1}) and set(slow.job_ids()) == {job}
    # A replay by id of a row that does not exist is refused by name; bad input is typed.
    missing = d.jobctl_json("webhooks", "replay", "999999")
    assert missing == {"replayed": [], "refused": [999999]}
    bad = d.jobctl("webhooks", "replay", "0", check=False)
    assert bad.returncode == 1 and "bad_request" in bad.stderr
    assert d.jobctl("webhooks", "list", "--limit", "0", check=False).returncode == 1
    # A receiver whose requests all fail never stopped the job path.
    assert d.jobctl_json("get", str(job))["state"] == "completed"
    wait_until(lambda: 'jobd_webhook_pending{webhook="broken"} 0.0' in scrape(port),
               "the backlog gauge to drain", daemons=(d,))
    text = scrape(port)
    for line in ('jobd_webhook_deliveries_total{outcome="failed",webhook="broken"} 1.0',
                 'jobd_webhook_deliveries_total{outcome="delivered",webhook="broken"} 1.0',
                 'jobd_webhook_deliveries_total{outcome="failed",webhook="slow"} 1.0',
                 'jobd_webhook_oldest_pending_age_seconds{webhook="slow"} 0.0'):
        assert line in text, line
    assert 'jobd_webhook_retries_total{reason="status_5xx",webhook="broken"}' in text
    assert 'jobd_webhook_retries_total{reason="timeout",webhook="slow"}' in text
    assert SECRET not in text and broken.url not in text
    # The same commands over HTTP, bearer token; a bad field is a typed 400.
    status, page = api(port, "webhook_list", {"state": "delivered", "limit": 10})
    assert status == 200 and {r["webhook"] for r in page["result"]["deliveries"]} == {
        "broken", "slow"}
    assert "url" not in json.dumps(page) and SECRET not in json.dumps(page)
    status, error = api(port, "webhook_list", {"limit": -1})
    assert (status, error["code"]) == (400, "bad_request") and "limit" in error["message"]
    status, error = api(port, "webhook_replay", {"ids": ["x"]})
    assert (status, error["code"]) == (400, "bad_request")
    status, error = api(port, "webhook_replay", {})
    assert (status, error["code"]) == (400, "bad_request")


def test_two_daemons_deliver_each_row_once(jobd, sql, tmp_path, receivers):
    receiver = receivers()
    receiver.up()
    extra = config(tmp_path, webhook_toml("shared", receiver, secret_path(tmp_path)))
    options = {"extra_toml": extra, "queues": {"default": {"concurrency": 20}},
               "jobs": {"retention.completed_max_count": 100_000}}
    a, b = jobd(**options), jobd(**options)
    args = tmp_path / "args.jsonl"
    args.write_text("{}\n" * 400)
    ids = a.jobctl_json("enqueue", "noop", "--args-file", str(args))["ids"]
    wait_until(lambda: sql.fetchval(
        "SELECT count(*) FROM jobd.webhook_outbox WHERE state = 'delivered'") == len(ids),
        "every row delivered", timeout=DEADLINE_S, daemons=(a, b))
    assert receiver.job_ids() == Counter({i: 1 for i in ids}), "a row was delivered twice"
    claimers = sql.fetchval("SELECT count(DISTINCT claimed_by) FROM jobd.webhook_outbox")
    assert claimers >= 1


def test_config_errors_are_one_line_and_reload_keeps_the_running_webhooks(
        jobd, sql, tmp_path, receivers):
    receiver = receivers()
    receiver.up()
    secret = secret_path(tmp_path)
    cases = {
        "host": config(tmp_path, webhook_toml("w", receiver, secret)).replace(
            '["127.0.0.1"]', '["example.com"]'),
        "secret": config(tmp_path, webhook_toml("w", receiver, tmp_path / "nope")),
        "event": config(tmp_path, webhook_toml("w", receiver, secret, events=["done"])),
    }
    for name, text in cases.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        result = subprocess.run([sys.executable, "-m", "daemon.main", "check-config",
                                 "--config", str(path)], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 78, (name, result.stderr)
        message = result.stderr.strip()
        assert "\n" not in message and "$.webhooks[0]" in message, message
        assert SECRET not in message and "Traceback" not in message

    d = jobd(extra_toml=config(tmp_path, webhook_toml("w", receiver, secret)))
    text = d.config.read_text()
    d.config.write_text(text.replace(str(secret), str(tmp_path / "gone")))
    reload = d.jobctl_json("reload")
    assert reload["ok"] is False and "secret" in reload["message"]
    job = int(d.jobctl("enqueue", "noop").stdout)
    wait_until(lambda: job in receiver.job_ids(), "delivery with the running config",
               daemons=(d,))
    assert SECRET not in d.log_text()
    assert SECRET not in json.dumps(d.jobctl_json("get", str(job)))


def test_sighup_drops_a_webhook_and_its_pending_rows_fail(jobd, sql, tmp_path, receivers):
    keep, drop = receivers(), receivers()
    keep.up()  # `drop` stays down
    secret = secret_path(tmp_path)
    d = jobd(extra_toml=config(tmp_path, webhook_toml("keep", keep, secret),
                               webhook_toml("drop", drop, secret)))
    first = int(d.jobctl("enqueue", "noop").stdout)
    wait_until(lambda: first in keep.job_ids(), "the first delivery", daemons=(d,))
    text = d.config.read_text()
    d.config.write_text(text[:text.index('[[webhooks]]\nname = "drop"')])
    assert d.jobctl_json("reload")["ok"] is True
    wait_until(lambda: [(r["webhook"], r["state"]) for r in outbox(sql)
                        if r["webhook"] == "drop"] == [("drop", "failed")],
               "the dropped webhook's row failed", daemons=(d,))
    second = int(d.jobctl("enqueue", "noop").stdout)
    wait_until(lambda: second in keep.job_ids(), "delivery after the reload", daemons=(d,))
    assert [r["job_id"] for r in outbox(sql) if r["webhook"] == "drop"] == [first]



def test_postgres_restart_with_rows_pending(cluster, tmp_path, receivers):
    """Rows pending when Postgres goes away are delivered once it is back; the courier
    waits the outage out like every other caller (the daemon never exits)."""
    url = cluster.create_database("jobd_wh_outage")
    sql = Sql(url)
    receiver = receivers()  # down
    extra = config(tmp_path, webhook_toml("w", receiver, secret_path(tmp_path)))
    d = JobdProcess(tmp_path / "d", url, extra_toml=extra)
    try:
        d.start()
        ids = [int(d.jobctl("enqueue", "noop").stdout) for _ in range(3)]
        wait_until(lambda: len(outbox(sql)) == 3 and all(r["attempts"] >= 1 for r in outbox(sql)),
                   "rows pending against the down receiver", daemons=(d,))
        cluster.stop()
        receiver.up()
        time.sleep(2)  # claims, records and upkeep fail meanwhile
        assert d.proc.poll() is None, d.log_text()
        cluster.start()
        wait_until(lambda: {r["state"] for r in outbox(sql)} == {"delivered"},
                   "delivery after the restart", timeout=DEADLINE_S, daemons=(d,))
        assert set(receiver.job_ids()) == set(ids)
        later = int(d.jobctl("enqueue", "noop").stdout)
        wait_until(lambda: later in receiver.job_ids(), "a new finish delivered", daemons=(d,))
        tree = d.jobctl_json("tree")
        assert all(child["state"] == "running" for child in tree["children"]), tree
    finally:
        d.kill()


def test_sigterm_lets_requests_in_flight_finish_and_be_recorded(jobd, sql, tmp_path, receivers):
    slow = receivers()
    slow.delay_s = 1.0
    slow.up()
    extra = config(tmp_path, webhook_toml("slow", slow, secret_path(tmp_path), timeout="5s",
                                          concurrency=4))
    d = jobd(extra_toml=extra)
    for _ in range(12):
        d.jobctl("enqueue", "noop")
    in_flight = ("SELECT count(*) FROM jobd.webhook_outbox WHERE state = 'pending'"
                 " AND claimed_by IS NOT NULL AND last_status IS NULL AND last_error IS NULL")
    wait_until(lambda: sql.fetchval(in_flight) > 0, "requests in flight", daemons=(d,))
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log_text()
    # Every request that was in flight got its answer and its record before the exit:
    # nothing is left leased to be sent a second time.
    assert sql.fetchval(in_flight) == 0
    delivered = sql.fetchval("SELECT count(*) FROM jobd.webhook_outbox WHERE state = 'delivered'")
    assert delivered >= 1 and delivered == len(slow.received)


def test_a_hung_receiver_blocks_neither_jobs_nor_other_webhooks(jobd, sql, tmp_path, receivers):
    hung, healthy = receivers(), receivers()
    hung.delay_s = 30.0  # answers nothing within the timeout
    hung.up()
    healthy.up()
    secret = secret_path(tmp_path)
    extra = config(tmp_path, webhook_toml("hung", hung, secret, timeout="20s", concurrency=2),
                   webhook_toml("healthy", healthy, secret))
    d = jobd(extra_toml=extra, jobs={"retention.completed_max_count": 100_000})
    args = tmp_path / "args.jsonl"
    args.write_text("{}\n" * 200)
    ids = d.jobctl_json("enqueue", "noop", "--args-file", str(args))["ids"]
    wait_until(lambda: finished(sql, len(ids)), "every job finished", daemons=(d,))
    wait_until(lambda: set(healthy.job_ids()) == set(ids), "the healthy webhook's deliveries",
               daemons=(d,))
    # The hung one holds its two slots and nothing else.
    in_flight = sql.fetchval("SELECT count(*) FROM jobd.webhook_outbox WHERE webhook = 'hung'"
                             " AND attempts > 0")
    assert in_flight <= 2


def test_a_killed_daemons_claims_are_sent_by_the_other(jobd, sql, tmp_path, receivers):
    slow = receivers()
    slow.delay_s = 0.3
    slow.up()
    extra = config(tmp_path, webhook_toml("shared", slow, secret_path(tmp_path), timeout="2s",
                                          concurrency=4))
    options = {"extra_toml": extra, "jobs": {"retention.completed_max_count": 100_000}}
    a, b = jobd(**options), jobd(**options)
    a_id = a.jobctl_json("ping")["daemon_id"]
    args = tmp_path / "args.jsonl"
    args.write_text("{}\n" * 150)
    ids = a.jobctl_json("enqueue", "noop", "--args-file", str(args))["ids"]
    claimed_by_a = ("SELECT count(*) FROM jobd.webhook_outbox WHERE state = 'pending'"
                    " AND claimed_by = $1 AND next_attempt_at > now()")
    wait_until(lambda: sql.fetchval(claimed_by_a, a_id) > 0, "A delivering", daemons=(a, b))
    a.kill()
    wait_until(lambda: sql.fetchval(
        "SELECT count(*) FROM jobd.webhook_outbox WHERE state = 'delivered'") == len(ids),
        "B to deliver everything, A's claims included", timeout=3 * DEADLINE_S, daemons=(b,))
    assert set(slow.job_ids()) == set(ids)
