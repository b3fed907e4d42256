"""The dashboard's data as control commands, with the real daemon: `inspect` (one run in
detail), `activity` (the last hour per queue) and the `error` filter of list, summary
and the bulk operations; and what each does with bad input."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta

import asyncpg

from actors.ports import NewJob
from actors.services.run_views import activity, run_detail
from daemon.store import migrate
from daemon.store.sql.runs import ACTIVITY
from protocol import SyncClient
from protocol import commands as c
from protocol.errors import NotFound
from tests.e2e.test_bad_values import RawClient
from tests.e2e.test_http_e2e import TOKEN, free_port, request
from tests.support import wait_until

MODULES = ["tests.inspect_handlers", "examples.basic"]
QUEUES = {"ia": {"concurrency": 4}, "default": {"concurrency": 2}}
JOBS = {"poll_interval": "0.5s", "reaper_interval": "0.5s"}


def start(jobd):
    return jobd(modules=MODULES, queues=QUEUES, jobs=JOBS)


def state_of(sql, job_id: int) -> str:
    return sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", job_id)


def failed_with(daemon, *args: str) -> dict:
    result = daemon.jobctl("--json", *args, check=False)
    assert result.returncode == 1, (args, result.stdout, result.stderr)
    return json.loads(result.stdout)["error"]


# --------------------------------------------------------------------------- inspect


def test_inspect_a_workflow_while_it_waits_and_after(jobd, sql):
    d = start(jobd)
    sent = d.jobctl_json("send-event", "ia/start", "--data", '{"n": 1, "big": true}')
    [jid] = sent["started"]

    def waiting() -> dict | None:
        run = d.jobctl_json("inspect", str(jid))
        return run if run["job"]["state"] == "waiting" and run["waiting_on"] and \
            run["waiting_on"]["type"] == "event" else None

    run = wait_until(waiting, "the workflow to wait for its event", daemons=(d,))
    assert run["job"]["id"] == jid and run["job"]["kind"] == "ia.flow"
    assert run["job"]["args"] == {"n": 1, "big": True}  # whole, as get shows it
    assert run["waiting_on"]["name"] == "ia/approve" and run["waiting_on"]["match"] == {"n": 1}
    assert run["event"]["id"] == sent["id"] and run["event"]["name"] == "ia/start"
    assert datetime.fromisoformat(run["event"]["sent_at"]) <= datetime.fromisoformat(
        run["job"]["created_at"]) + timedelta(seconds=1)
    assert run["parent_id"] is None

    steps = {s["name"]: s for s in run["steps"]}
    assert run["steps_total"] == len(run["steps"])
    # The big step result is left out and named; the others come whole.
    assert steps["prep"]["result"] is None and steps["prep"]["truncated"] == ["result"]
    assert steps["prep"]["done"] and steps["prep"]["duration_s"] >= 0
    assert steps["spawn:kids"]["result"] == [c_["id"] for c_ in run["children"]]
    assert steps["sleep:nap"]["done"] and steps["sleep:nap"]["duration_s"] >= 0
    wait_step = steps["event:ia/approve"]
    assert not wait_step["done"] and wait_step["duration_s"] is None

    assert run["children_total"] == 2 and len(run["children"]) == 2
    assert [k["state"] for k in run["children"]] == ["completed", "completed"]
    assert sorted(k["result"] for k in run["children"]) == [0, 10]

    child = d.jobctl_json("inspect", str(run["children"][0]["id"]))
    assert child["parent_id"] == jid and child["event"] is None
    assert child["children"] == [] and child["children_total"] == 0
    assert [s["name"] for s in child["steps"]] == ["work"]

    human = d.jobctl("inspect", str(jid)).stdout
    assert f"event: {sent['id']} 'ia/start'" in human
    assert "waiting for: event 'ia/approve'" in human
    assert "children (2 of 2):" in human and "prep" in human
    assert "(too large: result left out" in human

    d.jobctl("send-event", "ia/approve", "--data", '{"n": 1}')
    wait_until(lambda: state_of(sql, jid) == "completed", "the workflow to finish", daemons=(d,))
    done = d.jobctl_json("inspect", str(jid))
    assert done["waiting_on"] is None
    assert all(s["done"] and s["duration_s"] is not None for s in done["steps"])
    assert done["job"]["result"]["kids"] == [0, 10]
    assert done["job"]["result"]["prep"] == 10_000  # the job itself whole

    # The event pruned: the run still answers, with no event.
    sql.execute("DELETE FROM jobd.events WHERE id = $1", sent["id"])
    gone = d.jobctl_json("inspect", str(jid))
    assert gone["event"] is None and gone["job"]["event_id"] == sent["id"]
    assert "(pruned)" in d.jobctl("inspect", str(jid)).stdout

    # Misuse: a typed error each, and the daemon goes on.
    missing = failed_with(d, "inspect", "999999")
    assert missing["code"] == "not_found" and missing["details"] == {"id": 999999}
    assert failed_with(d, "inspect", "-3")["code"] == "bad_request"
    assert failed_with(d, "inspect", "0")["code"] == "bad_request"
    raw = RawClient(d.socket)
    try:
        for bad in ({"type": "inspect"}, {"type": "inspect", "job_id": "7"},
                    {"type": "inspect", "job_id": 1.5}, {"type": "inspect", "job_id": 2**63},
                    {"type": "inspect", "job_id": None}, {"type": "inspect", "job_id": [1]}):
            reply = raw.call(bad)
            assert reply["type"] == "error" and reply["code"] == "bad_request", (bad, reply)
            assert "job_id" in reply["message"], reply
        assert raw.call({"type": "inspect", "job_id": jid})["result"]["job"]["id"] == jid
    finally:
        raw.close()


# --------------------------------------------------------------------------- error filter


def test_error_filter_finds_tracebacks_literally_and_drives_bulk_retry(jobd, sql):
    d = start(jobd)

    def boom(kind: str, message: str) -> int:
        return int(d.jobctl("enqueue", kind, "--args", json.dumps({"message": message})).stdout)

    pct = boom("ia.boom", "quota at 100% for tenant_7")
    lookalike = boom("ia.boom", "quota at 1000 for tenantX7")  # what % and _ would match
    fatal = boom("ia.fatal", "Upstream Said NO")
    ok = int(d.jobctl("enqueue", "noop").stdout)
    wait_until(lambda: [state_of(sql, i) for i in (pct, lookalike, fatal, ok)]
               == ["failed", "failed", "failed", "completed"], "the jobs to finish", daemons=(d,))

    def listed(*filters: str) -> list[int]:
        return sorted(j["id"] for j in d.jobctl_json("list", *filters)["jobs"])

    assert listed("--error", "100%") == [pct]
    assert listed("--error", "tenant_7") == [pct]
    assert listed("--error", "%") == [pct]
    assert listed("--error", "QUOTA AT 1") == [pct, lookalike]  # any case
    assert listed("--error", "upstream said no") == [fatal]
    # The traceback, not only the message: the raise line's comment is only there.
    assert listed("--error", "ia-boom-marker") == [pct, lookalike]
    assert listed("--error", "ia-boom-marker", "--kind", "ia.fatal") == []
    assert listed("--error", "no such text anywhere") == []
    assert listed("--error", "\\") == []
    summary = d.jobctl_json("summary", "--error", "quota")
    assert summary["total"] == 2 and summary["failed"] == 2

    # A hand-written errors value in another shape matches nothing, and breaks nothing.
    sql.execute("""UPDATE jobd.jobs SET errors = '{"message": "quota"}' WHERE id = $1""", ok)
    assert listed("--error", "quota") == [pct, lookalike]
    sql.execute("""UPDATE jobd.jobs SET errors = '["quota", 1, null]' WHERE id = $1""", ok)
    assert listed("--error", "quota") == [pct, lookalike]

    # Every bulk statement takes the filter (their parameters after it were renumbered).
    dry = d.jobctl_json("retry", "--error", "100%", "--dry-run")
    assert dry == {"matched": 1, "changed": 0, "dry_run": True, "ids": []}
    assert state_of(sql, pct) == "failed"
    assert d.jobctl_json("replay", "--error", "quota", "--dry-run")["matched"] == 2
    assert d.jobctl_json("delete", "--error", "quota", "--dry-run")["matched"] == 2
    assert d.jobctl_json("cancel", "--error", "quota", "--dry-run")["matched"] == 0
    assert "1 jobs match (dry run" in d.jobctl("retry", "--error", "100%", "--dry-run").stdout
    retried = d.jobctl_json("retry", "--error", "100%")
    assert retried["matched"] == 1 and retried["changed"] == 1
    wait_until(lambda: sql.fetchval("SELECT attempt FROM jobd.jobs WHERE id = $1", pct) == 2
               and state_of(sql, pct) == "failed", "the retry to run and fail again",
               daemons=(d,))
    assert state_of(sql, lookalike) == "failed"
    assert sql.fetchval("SELECT attempt FROM jobd.jobs WHERE id = $1", lookalike) == 1
    # The error filter alone is a filter: a bulk operation with it is not refused.
    assert d.jobctl_json("delete", "--error", "upstream")["changed"] == 1

    # Misuse.
    for command in ("list", "summary", "retry", "inspect", "activity"):  # help prints clean
        shown = d.jobctl(command, "--help").stdout
        assert "option_strings" not in shown, shown
    assert "(any case; % and _ are plain characters)" in " ".join(
        d.jobctl("list", "--help").stdout.split())
    too_long = failed_with(d, "list", "--error", "x" * 1025)
    assert too_long["code"] == "bad_request" and "error" in too_long["message"]
    assert listed("--error", "x" * 1024) == []  # the longest allowed
    raw = RawClient(d.socket)
    try:
        for bad in ({"type": "list", "error": 5}, {"type": "list", "error": ["quota"]},
                    {"type": "summary", "error": "a\u0000b"},
                    {"type": "retry", "error": {"like": "%"}, "dry_run": True}):
            reply = raw.call(bad)
            assert reply["type"] == "error" and reply["code"] == "bad_request", (bad, reply)
            assert "error" in reply["message"], reply
        # The empty text is in every error: the jobs that have one.
        page = raw.call({"type": "list", "error": ""})["result"]["jobs"]
        assert sorted(j["id"] for j in page) == [pct, lookalike]
    finally:
        raw.close()


# --------------------------------------------------------------------------- activity


def test_activity_counts_the_last_hour_per_queue(jobd, sql, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    port = free_port()
    d = jobd(modules=MODULES, queues=QUEUES, jobs=JOBS,
             control={"http": f"127.0.0.1:{port}", "token_file": str(token)})
    base = f"http://127.0.0.1:{port}"
    done = [int(d.jobctl("enqueue", "noop").stdout) for _ in range(3)]
    bad = [int(d.jobctl("enqueue", "flaky", "--args", '{"fatal": true}').stdout)
           for _ in range(2)]
    # A queue no daemon serves: its jobs wait; the oldest is its head.
    idle = [int(d.jobctl("enqueue", "noop", "--queue", "idle").stdout) for _ in range(2)]
    later = int(d.jobctl("enqueue", "noop", "--queue", "later", "--delay", "1h").stdout)
    wait_until(lambda: all(state_of(sql, i) in ("completed", "failed") for i in done + bad),
               "the jobs to finish", daemons=(d,))
    # Outside the window: finished two hours ago; cancelled jobs are not counted.
    sql.execute("UPDATE jobd.jobs SET finished_at = now() - interval '2 hours' WHERE id = $1",
                done[0])

    result = d.jobctl_json("activity")
    now = datetime.fromisoformat(result["now"])
    starts = [datetime.fromisoformat(s) for s in result["bucket_starts"]]
    assert result["bucket_s"] == 300 and len(starts) == 12
    assert all(b - a == timedelta(minutes=5) for a, b in zip(starts, starts[1:], strict=False))
    assert starts[-1] <= now < starts[-1] + timedelta(minutes=5)
    assert starts[0].timestamp() % 300 == 0
    queues = {q["queue"]: q for q in result["queues"]}
    default = queues["default"]
    assert sum(default["completed"]) == 2 and sum(default["failed"]) == 2
    assert len(default["completed"]) == len(default["failed"]) == 12
    assert default["completed"][-1] + default["completed"][-2] == 2  # the last minutes
    assert default["oldest_available_id"] is None
    assert queues["idle"]["oldest_available_id"] == idle[0]
    assert queues["idle"]["oldest_wait_s"] >= 0
    assert sum(queues["idle"]["completed"]) == 0
    assert "later" not in queues  # scheduled, not due: not waiting yet
    sql.execute("UPDATE jobd.jobs SET run_at = now() - interval '10 minutes' WHERE id = $1", later)
    waited = {q["queue"]: q for q in d.jobctl_json("activity")["queues"]}["later"]
    assert waited["oldest_available_id"] == later and waited["oldest_wait_s"] >= 600

    with SyncClient(d.socket) as client:  # the client library's methods
        typed = client.activity()
        assert isinstance(typed, c.ActivityResult) and len(typed.bucket_starts) == 12
        run = client.inspect(idle[0])
        assert isinstance(run, c.RunDetail) and run.job.queue == "idle" and run.steps == []
    # Over HTTP, as the dashboard reads them; both in the generated OpenAPI.
    status, _, body = request(base, "GET", "/v1/openapi.json")
    paths = json.loads(body)["paths"]
    assert status == 200 and "/v1/inspect" in paths and "/v1/activity" in paths
    status, _, body = request(base, "POST", "/v1/activity", {})
    assert status == 200 and json.loads(body)["result"]["bucket_s"] == 300
    status, _, body = request(base, "POST", "/v1/inspect", {"job_id": idle[0]})
    assert status == 200 and json.loads(body)["result"]["job"]["id"] == idle[0]
    status, _, body = request(base, "POST", "/v1/inspect", {"job_id": 10**9})
    assert status == 404 and json.loads(body)["code"] == "not_found"
    status, _, body = request(base, "POST", "/v1/inspect", {"job_id": -1})
    assert status == 400 and json.loads(body)["code"] == "bad_request"
    status, _, body = request(base, "POST", "/v1/list", {"error": "x" * 1025})
    assert status == 400 and json.loads(body)["code"] == "bad_request"
    human = d.jobctl("activity").stdout
    assert "5-minute buckets" in human and f"job {idle[0]}," in human
    raw = RawClient(d.socket)
    try:
        reply = raw.call({"type": "activity", "job_id": "ignored"})  # unknown fields: ignored
        assert reply["type"] == "ok" and len(reply["result"]["bucket_starts"]) == 12
        reply = raw.call({"type": "activity", "id": "x"})
        assert reply["type"] == "error" and reply["code"] == "bad_request"
    finally:
        raw.close()


async def test_activity_places_jobs_in_their_buckets(store, sql):
    """On the store: bucket edges, and every queue and lane of the skip over heads."""
    ids = [e.id for e in await store.enqueue_many(
        [NewJob(kind="k", queue=q, priority=p) for q, p in
         (("a", 0), ("a", 0), ("a", 5), ("b", -1), ("c", 0), ("c", 0))])]
    for _ in range(3):  # again if a bucket edge passed between the two calls
        since = (await store.activity(300, 12))["since"]
        for job_id, state, offset in ((ids[0], "completed", 0), (ids[1], "failed", 299.9),
                                      (ids[4], "completed", 300), (ids[5], "completed", -1)):
            sql.execute("UPDATE jobd.jobs SET state = $2, finished_at = $3 WHERE id = $1",
                        job_id, state, since + timedelta(seconds=offset))
        sql.execute("UPDATE jobd.jobs SET run_at = now() - interval '1 minute' WHERE id = $1",
                    ids[2])
        result = await activity(store)
        if result.bucket_starts[0] == since:
            break
    queues = {q.queue: q for q in result.queues}
    assert queues["a"].completed[0] == 1 and queues["a"].failed[0] == 1
    assert queues["c"].completed[:2] == [0, 1] and sum(queues["c"].completed) == 1
    # Heads: one per queue, the oldest due run_at across its priorities.
    assert queues["a"].oldest_available_id == ids[2]
    assert queues["b"].oldest_available_id == ids[3]
    assert queues["c"].oldest_available_id is None
    assert result.bucket_starts[0] == since and isinstance(result, c.ActivityResult)


async def test_inspect_cuts_large_values_and_caps_children(store, sql):
    """On the store: list-style cuts for children and steps, the children cap, a wait
    shown only while waiting, and an unknown id."""
    [parent] = [e.id for e in await store.enqueue_many([NewJob(kind="p", args='{"a": 1}')])]
    big = json.dumps({"blob": "y" * 5000})
    kids = [e.id for e in await store.enqueue_many(
        [NewJob(kind="kid", args=big if i == 0 else "{}") for i in range(101)])]
    sql.execute("UPDATE jobd.jobs SET parent_id = $1 WHERE id = any($2)", parent, kids)
    sql.execute("UPDATE jobd.jobs SET result = $2::jsonb, progress_note = $3 WHERE id = $1",
                kids[0], big, "n" * 5000)
    sql.execute("""INSERT INTO jobd.job_steps (job_id, name, result, error, attempts, finished_at)
                   VALUES ($1, 'small', '7', NULL, 1, now()), ($1, 'huge', NULL, $2::jsonb, 3, NULL)
                """, parent, json.dumps({"class": "x", "message": "m" * 5000}))
    sql.execute("""UPDATE jobd.jobs SET state = 'waiting',
                   waiting_on = '{"type": "children", "ids": [1], "step": "gather:k"}'
                   WHERE id = $1""", parent)

    run = await run_detail(store, parent, 4096)
    assert run.job.args == {"a": 1} and run.job.truncated == []
    assert run.children_total == 101 and len(run.children) == c.MAX_INSPECT_CHILDREN
    assert [k.id for k in run.children] == sorted(kids)[:100]
    first = run.children[0]
    assert first.args is None and first.result is None
    assert sorted(first.truncated) == ["args", "progress_note", "result"]
    assert first.progress_note == "n" * 1024
    assert run.children[1].args == {} and run.children[1].truncated == []
    steps = {s.name: s for s in run.steps}
    assert steps["small"].result == 7 and steps["small"].done and steps["small"].truncated == []
    assert steps["huge"].error is None and steps["huge"].truncated == ["error"]
    assert not steps["huge"].done and steps["huge"].duration_s is None
    assert steps["huge"].attempts == 3 and run.steps_total == 2
    assert run.waiting_on == {"type": "children", "ids": [1], "step": "gather:k"}
    assert run.event is None and run.parent_id is None

    sql.execute("UPDATE jobd.jobs SET state = 'available' WHERE id = $1", parent)
    assert (await run_detail(store, parent, 4096)).waiting_on is None  # kept, not waiting
    leaf = await run_detail(store, kids[5], 4096)
    assert leaf.parent_id == parent and leaf.children == [] and leaf.children_total == 0
    try:
        await run_detail(store, 10**9, 4096)
        raise AssertionError("no error for an unknown job")
    except NotFound as exc:
        assert exc.details == {"id": 10**9}


# 10 queues x 3 priorities; 70% completed and 10% failed over the last 24 hours (failed
# ones with a message and a traceback), 15% available (due), 5% scheduled (tomorrow).
SEED = """
INSERT INTO jobd.jobs (queue, kind, priority, state, run_at, finished_at, errors, created_at)
SELECT 'q' || (i % 10), 'kind' || (i % 7), (i % 3)::smallint,
       CASE WHEN i % 20 < 14 THEN 'completed' WHEN i % 20 < 16 THEN 'failed'
            WHEN i % 20 < 19 THEN 'available' ELSE 'scheduled' END,
       CASE WHEN i % 20 = 19 THEN now() + interval '1 day'
            ELSE now() - (i % 86400) * interval '1 second' END,
       CASE WHEN i % 20 < 16 THEN now() - (i % 86400) * interval '1 second' END,
       CASE WHEN i % 20 IN (14, 15) THEN jsonb_build_array(jsonb_build_object(
           'attempt', 1, 'class', 'unknown', 'message', 'upstream said ' || (i % 1000),
           'traceback', repeat('  File "app/handlers.py", line 12, in run' || E'\\n', 8)))
            ELSE '[]'::jsonb END,
       now() - (i % 86400) * interval '1 second'
FROM generate_series(1, $1) i
"""


def test_activity_reads_the_finished_and_claimable_indexes(sql, fresh_database):
    """On a seeded table (a day of 100,000 jobs): the counts come from jobs_finished and
    the heads from jobs_claimable, never a scan of the table (bench/dashboard_pages.py
    times it on 1,000,000)."""
    async def seed() -> None:
        conn = await asyncpg.connect(fresh_database)
        try:
            await migrate.apply(conn)
            await conn.execute(SEED, 100_000)
            await conn.execute("ANALYZE jobd.jobs")
        finally:
            await conn.close()

    asyncio.run(seed())
    plan = "\n".join(r[0] for r in sql.fetch(f"EXPLAIN {ACTIVITY}", 300, 12))
    assert "jobs_finished" in plan and "jobs_claimable" in plan, plan
    assert "Seq Scan on jobs" not in plan, plan
