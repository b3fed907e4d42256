"""Every attempt is contained, with the real daemon: a handler raising anything, a value
Postgres cannot store, an insane row, a lapsed lease, a loop blocker, a hung job. The
daemon must go on (`ping` answers, later jobs run) and Postgres must hold what we say.
No timing assertions: waits poll for a state with a generous deadline."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.containment_handlers import RUNS_TABLE
from tests.support import JobdProcess, Sql, wait_until

MODULES = ["tests.e2e.containment_handlers"]
FINISHED = ("completed", "failed", "cancelled")


def enqueue(daemon: JobdProcess, kind: str, args: dict[str, Any] | None = None,
            *options: str) -> int:
    return int(daemon.jobctl("enqueue", kind, "--args", json.dumps(args or {}),
                             *options).stdout)


def finished(daemon: JobdProcess, sql: Sql, job_id: int) -> dict[str, Any]:
    def row() -> Any:
        r = sql.fetch("SELECT state, errors::text AS errors, result::text AS result,"
                      " progress_note, attempt FROM jobd.jobs WHERE id = $1", job_id)
        return r[0] if r and r[0]["state"] in FINISHED else None

    r = wait_until(row, f"job {job_id} to finish", timeout=30, daemons=(daemon,))
    return {**dict(r), "errors": json.loads(r["errors"]),
            "result": json.loads(r["result"]) if r["result"] else None}


def assert_alive(daemon: JobdProcess, sql: Sql) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_text()[-3000:]
    assert daemon.jobctl_json("ping")["ready"]
    assert finished(daemon, sql, enqueue(daemon, "plain"))["state"] == "completed"


# --------------------------------------------------------------------------- item 15


@pytest.mark.parametrize("kind,what", [
    ("poison", "KeyboardInterrupt"), ("poison", "SystemExit"), ("poison", "BaseException"),
    ("poison", "group"), ("poison_sync", "SystemExit")])
def test_a_handler_raising_anything_fails_its_attempt_as_crashed(jobd, sql, kind, what):
    daemon = jobd(modules=MODULES)
    job_id = enqueue(daemon, kind, {"what": what})
    job = finished(daemon, sql, job_id)
    assert job["state"] == "failed"
    [error] = job["errors"]
    assert error["class"] == "crashed"
    assert "poison" in error["message"] or what == "group"
    assert "containment_handlers.py" in error["traceback"]  # where it was raised
    assert_alive(daemon, sql)
    crashed = [e for e in daemon.log_events() if e.get("event") == "job.crashed"]
    assert [e.get("job_id") for e in crashed] == [job_id]


# --------------------------------------------------------------------------- items 16, 2, 21


def test_values_postgres_cannot_store_fail_or_are_cleaned(jobd, sql):
    daemon = jobd(modules=MODULES, extra_toml="[limits]\nmax_result_bytes = 4096\n")
    ids = {what: enqueue(daemon, "unstorable", {"what": what}) for what in (
        "nul_result", "surrogate_result", "recursive_result", "big_result", "nul_error",
        "nul_progress", "bad_progress")}
    jobs = {what: finished(daemon, sql, job_id) for what, job_id in ids.items()}

    for what in ("nul_result", "surrogate_result", "recursive_result"):
        job = jobs[what]
        assert (job["state"], job["result"]) == ("failed", None), what
        assert [e["class"] for e in job["errors"]] == ["invalid_value"], what
    assert "NUL" in jobs["nul_result"]["errors"][0]["message"]
    assert "surrogate" in jobs["surrogate_result"]["errors"][0]["message"]
    assert "self-referencing" in jobs["recursive_result"]["errors"][0]["message"]

    big = jobs["big_result"]
    assert (big["state"], big["result"]) == ("failed", None)
    [error] = big["errors"]
    assert error["class"] == "result_too_large"
    assert "8011 bytes" in error["message"] and "4096" in error["message"]

    # Error messages and progress notes are stored with the characters replaced.
    [error] = jobs["nul_error"]["errors"]
    assert (jobs["nul_error"]["state"], error["message"]) == ("failed", "bad row: a\ufffdb \ufffd")
    assert jobs["nul_progress"]["state"] == "completed"
    assert jobs["nul_progress"]["progress_note"] == "note with \ufffd and \ufffd"
    bad = jobs["bad_progress"]
    assert bad["state"] == "completed" and "must be a str" in bad["result"]["caught"]
    assert_alive(daemon, sql)


def drop_timeout_checks(sql: Sql) -> None:
    """Helper d adds CHECK constraints on timeout_s; this test is about a row that
    slipped in anyway, so it removes whatever constraint would stop the insert."""
    for name in sql.fetch(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'jobd.jobs'::regclass"
            " AND contype = 'c' AND pg_get_constraintdef(oid) ILIKE '%timeout_s%'"):
        sql.execute(f'ALTER TABLE jobd.jobs DROP CONSTRAINT "{name["conname"]}"')


def test_a_row_with_an_insane_timeout_fails_and_the_pool_goes_on(jobd, sql):
    daemon = jobd(modules=MODULES)
    drop_timeout_checks(sql)
    ids = [sql.fetchval("INSERT INTO jobd.jobs (queue, kind, args, max_attempts, timeout_s)"
                        " VALUES ('default', 'plain', '{}', 3, $1::float8) RETURNING id", bad)
           for bad in (float("nan"), float("inf"), -5.0, 1e308)]
    for job_id in ids:
        job = finished(daemon, sql, job_id)
        assert job["state"] == "failed"
        [error] = job["errors"]
        assert error["class"] == "invalid_value" and "timeout_s" in error["message"]
    assert_alive(daemon, sql)


def test_a_hung_job_is_stopped_by_the_queue_timeout_or_the_global_max_runtime(jobd, sql):
    daemon = jobd(modules=MODULES, jobs={"max_runtime": "1s"},
                  queues={"hangs": {"timeout": "0.5s"}})
    on_queue = finished(daemon, sql, enqueue(daemon, "hang"))
    by_default = finished(daemon, sql, enqueue(daemon, "hang_default"))
    for job, limit in ((on_queue, "0.5"), (by_default, "1")):
        [error] = job["errors"]
        assert (job["state"], error["class"]) == ("failed", "timeout")
        assert error["message"] == f"timed out after {limit} s"


# --------------------------------------------------------------------------- item 17


def test_a_loop_stalled_past_the_lease_leaves_innocent_jobs_completed(jobd, sql, tmp_path):
    """A handler blocks the loop past the lease; meanwhile their leases lapse and are
    rescued (as another daemon's reaper would), so this daemon claims its own running
    jobs again. Each old attempt must be stopped before its job's new one starts, and
    the new one renewed: the innocents complete, none fails 'lease expired'."""
    from daemon.store.sql import leases

    sql.execute(RUNS_TABLE)
    daemon = jobd(modules=MODULES, queues={"default": {"concurrency": 10}},
                  jobs={"lease": "1s", "reaper_interval": "0.2s", "poll_interval": "0.2s"},
                  daemon={"heartbeat": "0.3s"})
    args_file = tmp_path / "innocents.jsonl"
    args_file.write_text('{"hold_s": 6}\n' * 5)
    innocents = daemon.jobctl_json("enqueue", "logged", "--args-file", str(args_file))["ids"]
    wait_until(lambda: sql.fetchval("SELECT count(*) FROM runs") == 5, "innocents running",
               daemons=(daemon,))
    blocker = enqueue(daemon, "logged", {"block_s": 4})  # the loop stops for 4 leases
    wait_until(lambda: sql.fetchval("SELECT count(*) FROM runs WHERE job_id = $1", blocker),
               "the blocker to start", daemons=(daemon,))
    sql.execute("UPDATE jobd.jobs SET lease_until = now() - interval '1 second'"
                " WHERE state = 'running' AND id = ANY($1::bigint[])", innocents)
    assert len(sql.fetch(leases.RESCUE_EXPIRED, 100, None)) == 5
    for job_id in [*innocents, blocker]:
        job = finished(daemon, sql, job_id)
        assert job["state"] == "completed", (job_id, job)
        assert all(e["class"] == "rescued" for e in job["errors"]), job["errors"]
    # Never two runs of one job at once in this daemon: each start follows the end of
    # the run before it.
    for job_id in innocents:
        events = [(r["event"], r["attempt"]) for r in sql.fetch(
            "SELECT event, attempt FROM runs WHERE job_id = $1 ORDER BY at", job_id)]
        assert events == [("start", 1), ("end", 1), ("start", 2), ("end", 2)], (job_id, events)
    assert_alive(daemon, sql)


# --------------------------------------------------------------------------- item 18


def test_a_sync_handler_runs_on_a_thread_while_the_daemon_answers(jobd, sql, tmp_path):
    daemon = jobd(modules=MODULES)
    gate = tmp_path / "gate"
    job_id = enqueue(daemon, "sync_wait", {"path": str(gate)})
    wait_until(lambda: sql.fetchval("SELECT progress_note FROM jobd.jobs WHERE id = $1",
                                    job_id) == "waiting in a thread",
               "the sync handler's first progress", daemons=(daemon,))
    # The handler is blocked in its thread; the loop still serves clients and jobs.
    assert daemon.jobctl_json("ping")["ready"]
    assert finished(daemon, sql, enqueue(daemon, "plain"))["state"] == "completed"
    assert sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", job_id) == "running"
    gate.write_text("opened")
    job = finished(daemon, sql, job_id)
    assert (job["state"], job["result"]) == ("completed", {"read": "opened", "one": 1})


def test_a_sync_handler_past_its_timeout_is_abandoned(jobd, sql):
    daemon = jobd(modules=MODULES)
    job = finished(daemon, sql, enqueue(daemon, "sync_sleep", {"seconds": 3}))
    [error] = job["errors"]
    assert (job["state"], error["class"]) == ("failed", "timeout")
    assert_alive(daemon, sql)


def test_a_blocking_async_handler_is_named_in_a_warning(jobd, sql):
    daemon = jobd(modules=MODULES, daemon={"loop_lag_warning": "0.2s"})
    job_id = enqueue(daemon, "loop_blocker", {"seconds": 0.6})
    assert finished(daemon, sql, job_id)["state"] == "completed"
    blocked = wait_until(lambda: [e for e in daemon.log_events()
                                  if e.get("event") == "loop.blocked" and e.get("kind")],
                         "the loop.blocked warning", daemons=(daemon,))
    assert [(e["kind"], e["job_id"]) for e in blocked] == [("loop_blocker", job_id)]
    assert "loop_blocker" in blocked[0]["msg"]
