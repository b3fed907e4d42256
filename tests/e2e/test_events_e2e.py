"""Events through a real `jobd run` (examples/events.py): every surface sends, subscribed
functions start and complete, repeats of an idempotency key start nothing (also racing
across two daemons), cancel_on stops a running job, a data/Struct mismatch fails only
that job, misuse is a typed one-line error on each surface, and a SIGKILL loses no
acknowledged event. No timing assertions: every wait polls until a generous deadline."""

from __future__ import annotations

import json
import threading
from typing import Any

import asyncpg
import pytest

from protocol.client import SyncClient
from protocol.errors import JobdError
from protocol.events import EventSpec
from tests import support
from tests.e2e.test_http_e2e import TOKEN, free_port, request, samples
from tests.support import JobdProcess, Sql

MODULES = ["examples.events"]
QUEUES = {"crawl": {"concurrency": 20}, "models": {"concurrency": 20}}
DEADLINE_S = 60.0


def start(jobd, tmp_path, **extra: Any) -> JobdProcess:
    port = free_port()
    token_file = tmp_path / f"api-token-{port}"
    token_file.write_text(TOKEN + "\n")
    proc = jobd(modules=MODULES, queues=QUEUES,
                control={"http": f"127.0.0.1:{port}", "token_file": str(token_file)}, **extra)
    proc.base = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return proc


def wait_until(what: str, predicate, *daemons: JobdProcess) -> Any:
    return support.wait_until(predicate, what, timeout=DEADLINE_S, daemons=daemons)


def states(sql: Sql, ids: list[int]) -> dict[int, str]:
    return {r["id"]: r["state"] for r in sql.fetch(
        "SELECT id, state FROM jobd.jobs WHERE id = ANY($1::bigint[])", ids)}


def test_every_surface_sends_and_the_subscribed_functions_run(jobd, sql, tmp_path):
    d = start(jobd, tmp_path)
    # jobctl, with an idempotency key; a repeat answers the first event and starts nothing.
    first = d.jobctl_json("send-event", "marketplace/capture", "--data",
                          '{"marketplace": "ebay", "region": "uk"}', "--id", "capture:ebay:1")
    assert first["created"] and len(first["started"]) == 2  # capture + the UK VAT check
    again = d.jobctl_json("send-event", "marketplace/capture", "--data",
                          '{"marketplace": "ebay", "region": "uk"}', "--id", "capture:ebay:1")
    assert again["id"] == first["id"] and not again["created"] and again["started"] == []
    assert "already sent with this id" in d.jobctl(
        "send-event", "marketplace/capture", "--id", "capture:ebay:1").stdout
    # HTTP.
    status, _, body = request(d.base, "POST", "/v1/send_event",
                              {"name": "marketplace/capture", "data": {"marketplace": "etsy"}})
    assert status == 200, body
    http = json.loads(body)["result"]
    assert http["created"] and len(http["started"]) == 1
    # The client, batched: one round trip, answered in order.
    with SyncClient(str(d.socket)) as client:
        batch = client.send_events([
            EventSpec(name="marketplace/capture", data={"marketplace": m}, idempotency_key=m)
            for m in ("amazon", "otto", "amazon")]).events
        single = client.send_event("prediction/requested", {"user_id": "u1", "question": "q?"})
    assert [e.created for e in batch] == [True, True, False] and batch[2].id == batch[0].id
    assert len(single.started) == 1
    # SQL, inside the application's transaction.
    sql_event = sql.fetchval("SELECT event_id FROM jobd.send_event('marketplace/capture', "
                             "'{\"marketplace\": \"zalando\"}', id => 'capture:zalando:1')")
    started = [*first["started"], *http["started"], *batch[0].started, *batch[1].started,
               *single.started,
               *sql.fetchval("SELECT jobs FROM jobd.events WHERE id = $1", sql_event)]
    assert len(started) == 7
    wait_until("every started job completes",
               lambda: set(states(sql, started).values()) == {"completed"}, d)
    keys = {r["key"] for r in sql.fetch(
        "SELECT key FROM jobd.jobs WHERE kind = 'marketplace.capture'")}
    assert keys == {"ebay", "etsy", "amazon", "otto", "zalando"}
    # Visibility: `get` names the event, `events list` the jobs each one started.
    job = d.jobctl_json("get", str(first["started"][0]))
    assert job["event_id"] == first["id"]
    assert f"started by event {first['id']}" in d.jobctl("get", str(first["started"][0])).stdout
    listed = {e["id"]: e for e in d.jobctl_json("events", "list")["events"]}
    assert sorted(listed[first["id"]]["jobs"]) == sorted(first["started"])
    assert listed[first["id"]]["idempotency_key"] == "capture:ebay:1"
    assert "capture:ebay:1" in d.jobctl("events", "list", "--name", "marketplace/capture").stdout
    # Metrics count what came through the API (the SQL send is not this daemon's).
    _, _, text = request(d.base, "GET", "/metrics", token=None)
    metrics = text.decode()
    assert samples(metrics, "jobd_events_received_total") == [({}, 5.0)]
    assert samples(metrics, "jobd_events_deduplicated_total") == [({}, 3.0)]
    assert dict((s[0]["kind"], s[1]) for s in samples(metrics, "jobd_event_jobs_started_total")) \
        == {"marketplace.capture": 4.0, "marketplace.vat_check": 1.0, "prediction.run": 1.0}


def test_cancel_on_event_stops_the_running_job_and_the_queued_ones(jobd, sql, tmp_path):
    d = start(jobd, tmp_path)
    with SyncClient(str(d.socket)) as client:
        running = client.send_event("prediction/requested",
                                    {"user_id": "u1", "question": "long", "think_s": 3600})
        other = client.send_event("prediction/requested",
                                  {"user_id": "u2", "question": "long", "think_s": 3600})
        [job_id] = running.started
        wait_until("the prediction runs",
                   lambda: states(sql, [job_id])[job_id] == "running", d)
        sql.execute("SELECT jobd.send_event('prediction/requested', "
                    "'{\"user_id\": \"u1\", \"question\": \"q\", \"think_s\": 3600}')")
        cancel = client.send_event("prediction/cancelled", {"user_id": "u1"})
    assert job_id in cancel.cancelled and len(cancel.cancelled) == 2
    wait_until("the running prediction is cancelled",
               lambda: set(states(sql, cancel.cancelled).values()) == {"cancelled"}, d)
    assert states(sql, other.started)[other.started[0]] in ("available", "running")
    assert d.jobctl_json("ping")["ready"]


def test_data_that_does_not_fit_the_struct_fails_that_job_not_the_send(jobd, sql, tmp_path):
    d = start(jobd, tmp_path)
    sent = d.jobctl_json("send-event", "marketplace/capture", "--data",
                         '{"marketplace": 5, "surprise": true}')
    assert sent["created"] and len(sent["started"]) == 1
    [job_id] = sent["started"]
    wait_until("the job fails", lambda: states(sql, [job_id])[job_id] == "failed", d)
    job = d.jobctl_json("get", str(job_id))
    assert job["attempt"] <= 1 and job["errors"][-1]["class"] == "validation"
    assert "marketplace.capture" in job["errors"][-1]["message"]


@pytest.mark.parametrize(("argv", "code", "says"), [
    (["send-event", "has space"], "bad_request", "$.name"),
    (["send-event", "x" * 201], "bad_request", "$.name"),
    (["send-event", "e", "--id", "k" * 257], "bad_request", "$.idempotency_key"),
    (["send-event", "--file", "{big}"], "too_large", "limits.max_args_bytes"),
    (["send-event", "e", "--data", '{"x": "\\u0000"}'], "bad_request", "NUL"),
    (["events", "list", "--limit", "0"], "bad_request", "$.limit"),
])
def test_misuse_is_a_typed_one_line_error_on_jobctl(jobd, tmp_path, argv, code, says):
    d = start(jobd, tmp_path)
    big = tmp_path / "big.ndjson"  # over the args limit, and too long for a command line
    big.write_text(json.dumps({"name": "e", "data": {"blob": "x" * 1_100_000}}) + "\n")
    result = d.jobctl(*[str(big) if a == "{big}" else a for a in argv], check=False)
    assert result.returncode == 1, result
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"jobctl: {code}: ") and says in line
    assert d.jobctl_json("ping")["ready"]


def test_misuse_over_the_socket_http_and_sql(jobd, sql, tmp_path):
    d = start(jobd, tmp_path)
    status, _, body = request(d.base, "POST", "/v1/send_event", {"name": "e", "data": [1]})
    assert status == 400 and json.loads(body)["code"] == "bad_request"
    status, _, body = request(d.base, "POST", "/v1/send_events",
                              {"events": [{"name": "e", "extra": 1}]})
    assert status == 400 and "extra" in json.loads(body)["message"]
    status, _, body = request(d.base, "POST", "/v1/send_events",
                              {"events": [{"name": "e"}] * 10_001})
    assert status == 400 and "$.events" in json.loads(body)["message"]
    with SyncClient(str(d.socket)) as client:
        with pytest.raises(JobdError) as caught:
            client.send_events([EventSpec(name="ok"), EventSpec(name="e", data={"x": "\x00"})])
        assert caught.value.code == "bad_request" and caught.value.details["index"] == 1
        assert client.list_events().events == []  # nothing of the refused batch was sent
    with pytest.raises(asyncpg.PostgresError) as refused:
        sql.fetchval("SELECT event_id FROM jobd.send_event('bad name', '{}')")
    assert refused.value.sqlstate == "22023"
    assert d.jobctl_json("ping")["ready"]


def test_two_daemons_racing_on_the_same_ids_start_each_event_once(jobd, sql, tmp_path):
    a = start(jobd, tmp_path)
    b = start(jobd, tmp_path)
    ids = [f"race:{n}" for n in range(100)]
    answers: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def sender(daemon: JobdProcess) -> None:
        with SyncClient(str(daemon.socket)) as client:
            for key in ids:
                got = client.send_event("marketplace/capture", {"marketplace": key},
                                        idempotency_key=key)
                with lock:
                    answers.append((got.id, got.created))

    threads = [threading.Thread(target=sender, args=(d,)) for d in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(answers) == 4 * len(ids)
    assert sum(created for _, created in answers) == len(ids)
    assert len({event for event, _ in answers}) == len(ids)
    assert sql.fetchval("SELECT count(*) FROM jobd.events") == len(ids)
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == len(ids)
    assert sql.fetchval("SELECT count(DISTINCT key) FROM jobd.jobs") == len(ids)


def test_sigkill_loses_no_acknowledged_event_and_a_resend_with_ids_is_exact(jobd, sql, tmp_path):
    d = start(jobd, tmp_path)
    acknowledged: list[int] = []

    def sender() -> None:
        try:
            with SyncClient(str(d.socket), timeout=5) as client:
                for n in range(2000):
                    got = client.send_event("marketplace/capture", {"marketplace": f"m{n}"},
                                            idempotency_key=f"kill:{n}")
                    acknowledged.append(got.id)
        except (JobdError, OSError):
            pass  # the daemon died under us

    thread = threading.Thread(target=sender)
    thread.start()
    wait_until("some events are acknowledged", lambda: len(acknowledged) >= 50, d)
    d.kill()
    thread.join(30)
    stored = {r["id"]: len(r["jobs"]) for r in sql.fetch("SELECT id, jobs FROM jobd.events")}
    assert set(acknowledged) <= set(stored)
    assert all(n == 1 for n in stored.values())  # an event and its job commit together
    d.start()
    with SyncClient(str(d.socket)) as client:
        for chunk in range(0, 2000, 500):
            client.send_events([EventSpec(name="marketplace/capture",
                                          data={"marketplace": f"m{n}"},
                                          idempotency_key=f"kill:{n}")
                                for n in range(chunk, chunk + 500)])
    assert sql.fetchval("SELECT count(*) FROM jobd.events") == 2000
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 2000


def test_a_reload_that_drops_a_subscription_removes_it(jobd, sql, tmp_path):
    module = tmp_path / "reload_events_mod.py"
    module.write_text(_RELOAD_MODULE.format(on_event='"thing/happened"'))
    d = jobd(modules=["reload_events_mod"], env={"PYTHONPATH": f"{support.ROOT}:{tmp_path}"})
    assert d.jobctl_json("send-event", "thing/happened")["started"] != []
    module.write_text(_RELOAD_MODULE.format(on_event="None"))
    assert d.jobctl_json("reload")["ok"]
    assert d.jobctl_json("send-event", "thing/happened")["started"] == []
    assert sql.fetchval("SELECT count(*) FROM jobd.event_subscriptions") == 0


_RELOAD_MODULE = """
from actors import job

@job("thing.do", on_event={on_event})
async def do(ctx, args: dict) -> None:
    return None
"""




def test_a_postgres_restart_is_a_typed_error_then_sends_resume(cluster, tmp_path):
    url = cluster.create_database("jobd_events_outage")
    d = JobdProcess(tmp_path / "d", url, modules=MODULES, queues=QUEUES,
                    jobs={"lease": "3s"}, daemon={"heartbeat": "0.5s"})
    try:
        d.start()
        first = d.jobctl_json("send-event", "marketplace/capture", "--data",
                              '{"marketplace": "ebay"}', "--id", "outage:1")
        cluster.stop()
        result = d.jobctl("send-event", "marketplace/capture", "--id", "outage:2", check=False)
        assert result.returncode == 1 and result.stderr.startswith("jobctl: unavailable: ")
        assert len(result.stderr.strip().splitlines()) == 1
        cluster.start()
        wait_until("ready again", lambda: d.jobctl_json("ping")["ready"], d)
        again = d.jobctl_json("send-event", "marketplace/capture", "--id", "outage:1")
        assert again["id"] == first["id"] and not again["created"]
        second = d.jobctl_json("send-event", "marketplace/capture", "--data",
                               '{"marketplace": "otto"}', "--id", "outage:2")
        assert second["created"] and len(second["started"]) == 1
        sql = Sql(url)
        wait_until("both captures complete", lambda: sql.fetchval(
            "SELECT count(*) FROM jobd.jobs WHERE state = 'completed'") == 2, d)
    finally:
        d.kill()


def test_a_client_hanging_up_mid_send_leaves_the_daemon_serving(jobd, sql, tmp_path):
    """The event is written or not (one transaction); a resend with its key tells which,
    and never makes a second one."""
    import socket as socket_module
    from urllib.parse import urlsplit

    d = start(jobd, tmp_path)
    host, port = urlsplit(d.base).hostname, urlsplit(d.base).port
    body = json.dumps({"name": "marketplace/capture", "data": {"marketplace": "gone"},
                       "idempotency_key": "hangup:1"}).encode()
    for _ in range(5):
        with socket_module.create_connection((host, port)) as conn:
            conn.sendall(b"POST /v1/send_event HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    # Over the socket too: a request line, then gone.
    for _ in range(5):
        with socket_module.socket(socket_module.AF_UNIX) as conn:
            conn.connect(str(d.socket))
            conn.sendall(b'{"type": "hello", "protocol": 1}\n{"id": 1, "type": "send_event", '
                         b'"name": "marketplace/capture", "data": {"marketplace": "gone"}, '
                         b'"idempotency_key": "hangup:2"}\n')
    for key in ("hangup:1", "hangup:2"):
        resent = d.jobctl_json("send-event", "marketplace/capture", "--data",
                               '{"marketplace": "gone"}', "--id", key)
        assert resent["id"] > 0
    assert sql.fetchval("SELECT count(*) FROM jobd.events") == 2
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 2
    assert d.jobctl_json("ping")["ready"]
