"""Flow-control tools through real daemons: two `jobd run` processes share one database
and the rules hold across them, because Postgres applies them at insertion (migration
0020). The timing logic itself is tested on a pinned clock in
tests/daemon/test_store_flow_tools.py; here only "eventually" is waited for."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from protocol.client import SyncClient
from protocol.errors import JobdError
from protocol.jobs import JobSpec
from tests.e2e.flow_tools_handlers import TABLE
from tests.e2e.test_http_e2e import TOKEN, free_port, request
from tests.support import ROOT, wait_until

MODULES = ["tests.e2e.flow_tools_handlers"]
OPTIONS = {"modules": MODULES, "jobs": {"lease": "3s", "reaper_interval": "0.5s"},
           "queues": {"default": {"concurrency": 10}}}


def two(jobd):
    return jobd(**OPTIONS), jobd(**OPTIONS)


def clients(*daemons):
    return [SyncClient(str(d.socket)) for d in daemons]


def test_debounce_collapses_a_burst_sent_to_two_daemons_into_one_run_with_the_last_args(
        jobd, sql):
    sql.execute(TABLE)
    a, b = two(jobd)
    ca, cb = clients(a, b)
    outcomes = []
    for n in range(20):
        for market in ("ebay", "etsy"):
            client = ca if n % 2 else cb
            outcomes.append(client.enqueue("tools.capture", {"market": market, "n": n}).outcome)
    assert outcomes.count("created") == 2 and outcomes.count("debounced") == 38
    runs = wait_until(lambda: sql.fetch("SELECT key, n FROM tool_runs ORDER BY key") if
                      sql.fetchval("SELECT count(*) FROM tool_runs") >= 2 else None,
                      "the debounced runs", daemons=(a, b))
    time.sleep(1.0)  # nothing else may run
    runs = sql.fetch("SELECT key, n FROM tool_runs ORDER BY key")
    assert [(r["key"], r["n"]) for r in runs] == [("ebay", 19), ("etsy", 19)]
    job = ca.get(sql.fetchval("SELECT job_id FROM tool_runs WHERE key = 'ebay'"))
    assert job.state == "completed" and job.args == {"market": "ebay", "n": 19}


def test_batching_across_two_daemons_and_sql_never_splits_or_duplicates(jobd, sql):
    sql.execute(TABLE)
    a, b = two(jobd)
    ca, cb = clients(a, b)
    for i in range(20):
        (ca if i % 2 else cb).enqueue("tools.daily", {"day": "mon", "i": i})
    # A batch of specs and SQL enqueues join the same batches.
    cb.enqueue_batch([JobSpec(kind="tools.daily", args={"day": "tue", "i": i}) for i in range(7)])
    for i in range(3):
        sql.fetchval("SELECT jobd.enqueue('tools.daily', $1::jsonb)", f'{{"day": "tue", "i": {100 + i}}}')
    wait_until(lambda: sql.fetchval("SELECT count(*) FROM tool_items") >= 30, "every item",
               daemons=(a, b))
    time.sleep(1.5)  # a duplicate would show up now
    items = sql.fetch("SELECT job_id, day, i FROM tool_items")
    assert len(items) == 30
    assert len({(r["day"], r["i"]) for r in items}) == 30
    sizes = sql.fetch("SELECT job_id, count(*) AS n, min(day) AS day, max(day) AS day2 "
                      "FROM tool_items GROUP BY job_id")
    assert all(r["day"] == r["day2"] for r in sizes)  # per key
    assert all(r["n"] <= 5 for r in sizes)
    assert sorted(r["n"] for r in sizes if r["day"] == "mon") == [5, 5, 5, 5]
    assert sum(r["n"] for r in sizes if r["day"] == "tue") == 10
    # The job's args hold exactly the items its run recorded.
    for r in sizes:
        view = ca.get(r["job_id"])
        assert len(view.args["items"]) == r["n"]
    assert sql.fetchval("SELECT count(*) FROM jobd.batch_items") == 0


def test_a_batch_is_never_split_or_duplicated_through_sigkill(jobd, sql):
    sql.execute(TABLE)
    a = jobd(**OPTIONS)
    total = 200
    SyncClient(str(a.socket)).enqueue_batch(
        [JobSpec(kind="tools.daily", args={"day": f"d{i % 4}", "i": i, "hold_s": 0.3})
         for i in range(total)])
    for _ in range(3):
        wait_until(lambda: sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE state = 'running'"),
                   "running batches", daemons=(a,))
        a.kill()
        a.start()
    wait_until(lambda: sql.fetchval("SELECT count(*) FROM tool_items") >= total,
               "every item", timeout=120, daemons=(a,))
    items = sql.fetch("SELECT job_id, i FROM tool_items")
    assert sorted(r["i"] for r in items) == list(range(total))  # none lost, none twice
    # Each batch job's stored args are exactly what its one successful run recorded.
    by_job: dict[int, set[int]] = {}
    for r in items:
        by_job.setdefault(r["job_id"], set()).add(r["i"])
    for job_id, seen in by_job.items():
        args = sql.fetchval("SELECT args FROM jobd.jobs WHERE id = $1", job_id)
        assert {x["i"] for x in json.loads(args)["items"]} == seen
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE kind = 'tools.daily' "
                        "AND state <> 'completed'") == 0


def test_throttle_drop_skips_the_excess_across_two_daemons_and_http(jobd, sql, tmp_path):
    sql.execute(TABLE)
    port = free_port()
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    a = jobd(**OPTIONS, control={"http": f"127.0.0.1:{port}", "token_file": str(token_file)})
    b = jobd(**OPTIONS)
    base = f"http://127.0.0.1:{port}"
    ca, cb = clients(a, b)
    # 1/m with a burst of 2: within the test's few seconds, two of one account run.
    results = [(ca if n % 2 else cb).enqueue("tools.ping", {"acct": "u1", "n": n})
               for n in range(6)]
    status, _, body = request(base, "POST", "/v1/enqueue",
                              {"job": {"kind": "tools.ping", "args": {"acct": "u1", "n": 6}}})
    assert status == 200
    over_http = json.loads(body)["result"]
    assert over_http["outcome"] == "skipped_throttle"
    assert [r.outcome for r in results] == ["created"] * 2 + ["skipped_throttle"] * 4
    skipped = ca.get(results[-1].id)
    assert skipped.state == "skipped" and "throttle" in skipped.errors[-1].message
    listed = ca.list(state=["skipped"])
    assert {j.id for j in listed.jobs} == {r.id for r in results[2:]} | {over_http["id"]}
    assert cb.enqueue("tools.ping", {"acct": "u2"}).outcome == "created"
    wait_until(lambda: sql.fetchval("SELECT count(*) FROM tool_runs") == 3, "the admitted runs",
               daemons=(a, b))
    # Daemon a counts its own enqueues: two of the socket's skips and HTTP's one.
    status, _, body = request(base, "GET", "/metrics", token=None)
    text = body.decode()
    assert 'jobd_jobs_skipped_total{kind="tools.ping",reason="throttle"} 3.0' in text, text


def test_singleton_skip_and_cancel_across_two_daemons(jobd, sql):
    sql.execute(TABLE)
    a, b = two(jobd)
    ca, cb = clients(a, b)
    first = ca.enqueue("tools.sync", {"acct": "x", "n": 1, "hold_s": 2.0})
    wait_until(lambda: ca.get(first.id).state == "running", "the first sync running",
               daemons=(a, b))
    second = cb.enqueue("tools.sync", {"acct": "x", "n": 2})
    assert second.outcome == "skipped_singleton" and cb.get(second.id).state == "skipped"
    other = cb.enqueue("tools.sync", {"acct": "y", "n": 3})
    assert other.outcome == "created"

    old = ca.enqueue("tools.resync", {"acct": "x", "n": 1, "hold_s": 30.0})
    wait_until(lambda: ca.get(old.id).state == "running", "the old resync running",
               daemons=(a, b))
    new = cb.enqueue("tools.resync", {"acct": "x", "n": 2})
    assert new.outcome == "created"
    wait_until(lambda: ca.get(old.id).state == "cancelled", "the old resync cancelled",
               daemons=(a, b))
    wait_until(lambda: ca.get(new.id).state == "completed", "the new resync run",
               daemons=(a, b))
    wait_until(lambda: sql.fetchval("SELECT count(*) FROM tool_runs") == 3, "every run",
               daemons=(a, b))
    runs = sql.fetch("SELECT kind, key, n FROM tool_runs ORDER BY kind, key, n")
    assert [(r["kind"], r["key"], r["n"]) for r in runs] == [
        ("resync", "x", 2), ("sync", "x", 1), ("sync", "y", 3)]


def test_unique_mode_replace_through_the_socket(jobd, sql):
    sql.execute(TABLE)
    a = jobd(**OPTIONS)
    c = SyncClient(str(a.socket))
    first = c.enqueue("tools.replace", {"acct": "q", "n": 1}, unique_key="r1", delay_s=3)
    again = c.enqueue("tools.replace", {"acct": "q", "n": 2}, unique_key="r1")
    assert (again.id, again.created, again.outcome) == (first.id, False, "replaced")
    assert c.get(first.id).args == {"acct": "q", "n": 2, "hold_s": 0.0}


def test_misuse_is_typed_and_the_daemon_lives(jobd, sql):
    sql.execute(TABLE)
    a = jobd(**OPTIONS)
    c = SyncClient(str(a.socket))
    with pytest.raises(JobdError) as info:  # one item's type, not a list
        c.enqueue("tools.daily", {"day": "mon", "i": "seven"})
    assert info.value.code == "invalid_args"
    with pytest.raises(JobdError) as info:
        c.enqueue("tools.capture", {"market": "a\x00b"})
    assert info.value.code in ("invalid_args", "bad_request")
    assert c.enqueue("tools.capture", {"market": "ok"}).outcome == "created"
    # jobctl prints the id it folded into, and says so on stderr.
    first = a.jobctl("enqueue", "tools.capture", "--args", '{"market": "cli"}')
    again = a.jobctl("enqueue", "tools.capture", "--args", '{"market": "cli", "n": 2}')
    assert first.stdout == again.stdout and "debounced" in again.stderr
    assert c.ping().ready


@pytest.mark.parametrize(("table", "message"), [
    ('[kinds."tools.capture"]\nbatch_size = 5\nbatch_timeout = "1s"\n', "cannot be combined"),
    ('[kinds."tools.daily"]\nbatch_size = 0\n', "batch_size"),
    ('[kinds."tools.nope"]\ndebounce = "1s"\n', "no handler declares"),
    ('[kinds."tools.ping"]\nthrottle_mode = "cancel"\n', "throttle_mode"),
    ('[kinds."tools.capture"]\ndebounce = "soon"\n', "debounce"),
])
def test_a_bad_kinds_table_is_a_one_line_config_error(tmp_path, table, message):
    config = tmp_path / "jobd.toml"
    config.write_text(f'[handlers]\nmodules = {MODULES!r}\n'.replace("'", '"') + table)
    result = subprocess.run([sys.executable, "-m", "daemon.main", "check-config", "--config",
                             str(config)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 78, result
    assert message in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr


def test_kinds_overrides_reach_postgres_and_a_pending_debounce_survives_sigkill(jobd, sql):
    sql.execute(TABLE)
    a = jobd(**OPTIONS, extra_toml='[kinds."tools.capture"]\ndebounce = "4s"\n')
    row = sql.fetch("SELECT debounce_s, debounce_max_s, debounce_field FROM jobd.kind_tools "
                    "WHERE kind = 'tools.capture'")[0]
    assert (row["debounce_s"], row["debounce_max_s"], row["debounce_field"]) == (4.0, 60.0, "market")
    c = SyncClient(str(a.socket))
    pending = c.enqueue("tools.capture", {"market": "m", "n": 1})
    assert c.enqueue("tools.capture", {"market": "m", "n": 2}).id == pending.id
    a.kill()
    # The pending run is a row: it outlives the daemon, and the next one runs it.
    assert sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", pending.id) == "scheduled"
    a.start()
    wait_until(lambda: sql.fetchval("SELECT n FROM tool_runs WHERE job_id = $1", pending.id),
               "the debounced run after the restart", daemons=(a,))
    assert sql.fetchval("SELECT count(*) FROM tool_runs") == 1
    assert sql.fetchval("SELECT n FROM tool_runs") == 2


def test_reload_publishes_new_kinds_settings_and_refuses_a_bad_table(jobd, sql):
    sql.execute(TABLE)
    a = jobd(**OPTIONS, extra_toml='[kinds."tools.capture"]\ndebounce = "4s"\n')
    text = a.config.read_text()
    a.config.write_text(text.replace('debounce = "4s"', 'debounce = "9s"'))
    a.jobctl("reload")
    assert sql.fetchval("SELECT debounce_s FROM jobd.kind_tools "
                        "WHERE kind = 'tools.capture'") == 9.0
    a.config.write_text(text.replace('debounce = "4s"', 'batch_size = 5\nbatch_timeout = "1s"'))
    result = a.jobctl("reload", check=False)
    assert "refused" in result.stdout and "cannot be combined" in result.stdout
    assert sql.fetchval("SELECT debounce_s FROM jobd.kind_tools "
                        "WHERE kind = 'tools.capture'") == 9.0
    c = SyncClient(str(a.socket))
    assert c.enqueue("tools.capture", {"market": "x"}).outcome == "created"


def test_singleton_cancel_when_the_holders_daemon_is_sigkilled(jobd, sql):
    """The cancel request is a column: the rescue ends the killed daemon's attempt as
    `cancelled`, which wakes the new job on the surviving daemon."""
    sql.execute(TABLE)
    a = jobd(**OPTIONS)
    ca = SyncClient(str(a.socket))
    old = ca.enqueue("tools.resync", {"acct": "k", "n": 1, "hold_s": 60.0})
    wait_until(lambda: ca.get(old.id).state == "running", "the old resync running on a",
               daemons=(a,))
    b = jobd(**OPTIONS)  # started after: the old job is a's
    cb = SyncClient(str(b.socket))
    a.kill()
    new = cb.enqueue("tools.resync", {"acct": "k", "n": 2})
    assert cb.get(new.id).state == "waiting"
    wait_until(lambda: cb.get(new.id).state == "completed", "the new resync after the rescue",
               timeout=60, daemons=(b,))
    assert cb.get(old.id).state == "cancelled"
    assert [r["n"] for r in sql.fetch("SELECT n FROM tool_runs WHERE kind = 'resync'")] == [2]


def test_events_start_debounced_and_batched_jobs_across_two_daemons(jobd, sql):
    """Event-started jobs are created by jobd.enqueue (migration 0019), so the kind's
    tools apply to them as to any enqueue."""
    sql.execute(TABLE)
    a, b = two(jobd)
    ca, cb = clients(a, b)
    for n in range(10):
        (ca if n % 2 else cb).send_event("market/changed", {"market": "ebay", "n": n})
    for i in range(10):
        (ca if i % 2 else cb).send_event("user/signup", {"day": "mon", "i": i})
    sql.fetchval("SELECT event_id FROM jobd.send_event('user/signup', "
                 "'{\"day\": \"mon\", \"i\": 10}'::jsonb)")
    wait_until(lambda: sql.fetchval("SELECT count(*) FROM tool_items") == 11 and
               sql.fetchval("SELECT count(*) FROM tool_runs WHERE kind = 'on_change'") == 1,
               "the debounced run and every batched event", daemons=(a, b))
    time.sleep(1.0)
    assert [r["n"] for r in sql.fetch("SELECT n FROM tool_runs WHERE kind = 'on_change'")] == [9]
    items = sql.fetch("SELECT job_id, i FROM tool_items")
    assert sorted(r["i"] for r in items) == list(range(11))
    sizes = sql.fetch("SELECT count(*) AS n FROM tool_items GROUP BY job_id")
    assert sorted(r["n"] for r in sizes) == [3, 4, 4]  # full batches of 4, the rest at timeout


def test_a_handler_enqueueing_into_a_batch_kind(jobd, sql):
    sql.execute(TABLE)
    a = jobd(**OPTIONS)
    SyncClient(str(a.socket)).enqueue("tools.fanout", {"day": "wed", "n": 12})
    wait_until(lambda: sql.fetchval("SELECT count(*) FROM tool_items") == 12, "the batched items",
               daemons=(a,))
    sizes = sql.fetch("SELECT j.parent_id IS NOT NULL AS child, count(*) AS n "
                      "FROM tool_items t JOIN jobd.jobs j ON j.id = t.job_id GROUP BY t.job_id, 1")
    assert sorted(r["n"] for r in sizes) == [2, 5, 5] and all(r["child"] for r in sizes)
