"""Durable workflows with the real daemon: SIGKILL it mid-step, mid-sleep and mid-gather;
after each restart no completed step runs again, sleeps end on time, gathers complete,
and every pipeline ends with the result an undisturbed run gives."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import asyncpg
import msgspec

from tests.e2e.test_crash import wait_for_dead_sessions, wait_until
from tests.e2e.workflow_handlers import TABLES, PipelineArgs, expected

MODULES = ["tests.e2e.workflow_handlers"]
JOBS = {"lease": "2s", "reaper_interval": "0.5s", "poll_interval": "0.5s"}


def start(jobd):
    return jobd(modules=MODULES, queues={"wf": {"concurrency": 4}}, jobs=JOBS)


def make_tables(sql):
    for ddl in TABLES.values():
        sql.execute(ddl)


def enqueue(daemon, args: PipelineArgs) -> int:
    return int(daemon.jobctl("enqueue", "wf.pipeline", "--args",
                             msgspec.json.encode(args).decode()).stdout)


def done_steps(sql) -> set[tuple[int, str]]:
    return {(r["job_id"], r["name"]) for r in sql.fetch(
        "SELECT job_id, name FROM jobd.job_steps WHERE finished_at IS NOT NULL")}


def runs_after(sql, when) -> list[tuple[int, str]]:
    return [(r["job_id"], r["step"]) for r in sql.fetch(
        "SELECT job_id, step FROM step_runs WHERE at > $1", when)]


def kill_and_check(daemon, sql, what: str) -> tuple[set, object]:
    daemon.kill()
    wait_for_dead_sessions(sql)
    return done_steps(sql), sql.fetchval("SELECT clock_timestamp()")


def test_sigkill_mid_step_mid_sleep_mid_gather(jobd, sql):
    make_tables(sql)
    args = [PipelineArgs(seed=s, steps=5, hold_s=0.3, sleep_s=4.0, children=3,
                         child_hold_s=1.5) for s in range(1, 7)]
    daemon = start(jobd)
    ids = [enqueue(daemon, a) for a in args]
    checks = []

    # 1. mid-step: some steps done, some running.
    wait_until("steps under way", lambda: sql.fetchval(
        "SELECT count(*) >= 6 FROM step_runs"), daemons=(daemon,))
    checks.append(kill_and_check(daemon, sql, "mid-step"))
    daemon = start(jobd)

    # 2. mid-sleep: a pipeline suspended in its durable sleep (scheduled, no slot).
    wait_until("a pipeline asleep", lambda: sql.fetchval(
        "SELECT count(*) > 0 FROM jobd.jobs j JOIN jobd.job_steps s ON s.job_id = j.id"
        " AND s.name = 'sleep:nap' WHERE j.state = 'scheduled' AND s.finished_at > now()"),
        daemons=(daemon,))
    checks.append(kill_and_check(daemon, sql, "mid-sleep"))
    time.sleep(1.0)
    daemon = start(jobd)

    # 3. mid-gather: a parent waiting on its children.
    wait_until("a parent waiting on children", lambda: sql.fetchval(
        "SELECT count(*) > 0 FROM jobd.jobs WHERE state = 'waiting'"), daemons=(daemon,))
    checks.append(kill_and_check(daemon, sql, "mid-gather"))
    daemon = start(jobd)

    wait_until("every pipeline completed", lambda: sql.fetchval(
        "SELECT count(*) = 0 FROM jobd.jobs WHERE state <> 'completed'"), timeout=120,
        daemons=(daemon,))

    # No step that was done at a kill ran again afterwards.
    for done, killed_at in checks:
        again = [r for r in runs_after(sql, killed_at) if r in done]
        assert again == [], f"completed steps ran again after a kill: {again}"
    # A step ran more than once only if a kill interrupted it (in flight: started, not
    # stored): once, plus once per kill that caught it in flight.
    runs = sql.fetch("SELECT job_id, step, at FROM step_runs")
    for (job_id, step) in {(r["job_id"], r["step"]) for r in runs}:
        n = sum(1 for r in runs if (r["job_id"], r["step"]) == (job_id, step))
        interrupted = sum(
            1 for done, killed_at in checks
            if (job_id, step) not in done
            and any((r["job_id"], r["step"]) == (job_id, step) and r["at"] < killed_at
                    for r in runs))
        assert n <= 1 + interrupted, (job_id, step, n, interrupted)
    for job_id, a in zip(ids, args, strict=True):
        result = json.loads(sql.fetchval("SELECT result::text FROM jobd.jobs WHERE id = $1", job_id))
        want = expected(a)
        assert result["values"] == want["values"]
        assert result["children"] == want["children"]
        # Never early; late by at most the restarts' downtime plus polling.
        assert 0.0 <= result["late_s"] < 15.0, result
    # Suspensions are not attempts: each pipeline was claimed far more often than attempts.
    assert sql.fetchval("SELECT max(attempt) FROM jobd.jobs WHERE kind = 'wf.pipeline'") <= 4


def test_events_and_failure_hooks(jobd, sql):
    make_tables(sql)
    daemon = start(jobd)
    a = PipelineArgs(seed=7, steps=1, hold_s=0.0, event="subsector.approved")
    job_id = enqueue(daemon, a)
    wait_until("the pipeline waiting for approval", lambda: sql.fetchval(
        "SELECT state = 'waiting' FROM jobd.jobs WHERE id = $1", job_id), daemons=(daemon,))
    view = daemon.jobctl_json("get", str(job_id))
    assert view["waiting_on"]["type"] == "event" and view["steps"][0]["name"] == "s0"
    out = daemon.jobctl_json("send-event", "subsector.approved", "--data", '{"seed": 8}')
    assert out["woken"] == []
    out = daemon.jobctl_json("send-event", "subsector.approved",
                             "--data", '{"seed": 7, "by": "ann"}')
    assert out["woken"] == [job_id]
    wait_until("approved pipeline completed", lambda: sql.fetchval(
        "SELECT state = 'completed' FROM jobd.jobs WHERE id = $1", job_id), daemons=(daemon,))
    assert json.loads(sql.fetchval("SELECT result::text FROM jobd.jobs WHERE id = $1",
                                   job_id))["approval"] == {"seed": 7, "by": "ann"}

    doomed = int(daemon.jobctl("enqueue", "wf.doomed", "--args", '{"credits": 5}').stdout)
    wait_until("the refund hook ran", lambda: sql.fetchval(
        "SELECT count(*) = 1 FROM jobd.jobs WHERE kind = 'jobd.on_failure'"
        " AND state = 'completed'"), daemons=(daemon,))
    assert sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", doomed) == "failed"
    assert sql.fetchval("SELECT sum(credits) FROM refunds") == 5
    # cancel cascades to children
    parent = enqueue(daemon, PipelineArgs(seed=9, steps=0, children=2, child_hold_s=30))
    wait_until("parent waiting", lambda: sql.fetchval(
        "SELECT state = 'waiting' FROM jobd.jobs WHERE id = $1", parent), daemons=(daemon,))
    daemon.jobctl("cancel", str(parent))
    wait_until("children cancelled", lambda: sql.fetchval(
        "SELECT bool_and(state = 'cancelled') FROM jobd.jobs WHERE parent_id = $1", parent),
        daemons=(daemon,))


class TableLock:
    """Holds LOCK TABLE ... IN EXCLUSIVE MODE on its own connection until released:
    reads go on, every insert into the table waits."""

    def __init__(self, url: str, table: str):
        self._release = threading.Event()
        self._held = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._hold(url, table)))
        self._thread.start()
        assert self._held.wait(30), "could not take the lock"

    async def _hold(self, url: str, table: str) -> None:
        conn = await asyncpg.connect(url)
        self.pid = conn.get_server_pid()
        try:
            async with conn.transaction():
                await conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
                self._held.set()
                await asyncio.to_thread(self._release.wait)
        finally:
            await conn.close()

    def release(self) -> None:
        self._release.set()
        self._thread.join(30)


def test_sigkill_between_a_suspension_and_its_record_loses_nothing(jobd, sql):
    """The sleep is recorded by the completer's finish, not by the handler: kill the
    daemon while those finishes wait (a lock on jobd.job_steps holds them), and every
    workflow still ends with its result, no stored step runs again, and only the part of
    the handler with no step in it (up to the suspension) runs twice."""
    make_tables(sql)
    n = 8
    daemon = jobd(modules=MODULES, queues={"wf": {"concurrency": 2 * n}}, jobs=JOBS)
    ids = [int(daemon.jobctl("enqueue", "wf.gated", "--args", json.dumps({"seed": s})).stdout)
           for s in range(1, n + 1)]
    wait_until("every first step stored", lambda: sql.fetchval(
        "SELECT count(*) FROM jobd.job_steps WHERE name = 'before' AND finished_at IS NOT NULL")
        == n, daemons=(daemon,))
    lock = TableLock(sql.url, "jobd.job_steps")
    try:
        sql.execute("INSERT INTO gate VALUES (true)")
        wait_until("every workflow suspending", lambda: sql.fetchval(
            "SELECT count(*) FROM step_runs WHERE step = 'suspending'") == n, daemons=(daemon,))
        wait_until("the finish that records the sleeps waiting on the lock", lambda: sql.fetchval(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE '%WITH done AS%'"), daemons=(daemon,))  # FINISH_MANY
        daemon.kill()
        # The blocked finish would run once the lock goes: end it first, as a crash of the
        # daemon's host would.
        sql.fetch("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                  " WHERE datname = current_database() AND backend_type = 'client backend'"
                  " AND pid NOT IN (pg_backend_pid(), $1)", lock.pid)
    finally:
        lock.release()
    wait_for_dead_sessions(sql)
    assert sql.fetchval("SELECT count(*) FROM jobd.job_steps WHERE name = 'sleep:nap'") == 0
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE state = 'running'") == n

    daemon = jobd(modules=MODULES, queues={"wf": {"concurrency": 2 * n}}, jobs=JOBS)
    wait_until("every workflow completed", lambda: sql.fetchval(
        "SELECT count(*) FROM jobd.jobs WHERE state = 'completed'") == n, timeout=90,
        daemons=(daemon,))
    for seed, job_id in enumerate(ids, start=1):
        result = json.loads(sql.fetchval("SELECT result::text FROM jobd.jobs WHERE id = $1",
                                         job_id))
        assert result == {"before": seed, "after": seed * 2}
    runs = {(r["step"], r["n"]) for r in sql.fetch(
        "SELECT step, count(*) AS n FROM step_runs GROUP BY job_id, step")}
    # Stored steps ran once; the stepless stretch before the sleep once per run: the
    # killed one, its re-run (which suspends again) and the resume.
    assert runs == {("before", 1), ("after", 1), ("suspending", 3)}


def test_sigkill_mid_step_batch_loses_no_acknowledged_step(jobd, sql, tmp_path):
    """Steps of many workflows go to Postgres in shared statements (the step writer's
    group commit), and a step's await returns only after its statement committed: SIGKILL
    the daemon while those batches stream, and every step a workflow saw return is
    stored; after a restart every workflow completes with each step stored once."""
    n, steps = 60, 30
    acks = tmp_path / "acks"
    daemon = jobd(modules=MODULES, queues={"wf": {"concurrency": n}}, jobs=JOBS)
    # All at once (its poll finds them): the workflows' steps then finish together.
    sql.execute("INSERT INTO jobd.jobs (kind, queue, args) SELECT 'wf.acked', 'wf', $1::jsonb"
                " FROM generate_series(1, $2)",
                json.dumps({"acks": str(acks), "steps": steps}), n)

    def acknowledged() -> set[tuple[int, str]]:
        if not acks.exists():
            return set()
        lines = acks.read_text().splitlines()
        return {(int(j), s) for j, s in (ln.split() for ln in lines if ln.count(" ") == 1)}

    wait_until("steps streaming", lambda: len(acknowledged()) >= n * steps // 4,
               daemons=(daemon,))
    daemon.kill()
    seen = acknowledged()  # after the kill: nothing more can be acknowledged
    wait_for_dead_sessions(sql)
    stored = done_steps(sql)
    assert seen - stored == set(), f"acknowledged steps lost: {sorted(seen - stored)[:10]}"
    assert len(seen) < n * steps, "the kill came after everything had finished"

    daemon = jobd(modules=MODULES, queues={"wf": {"concurrency": n}}, jobs=JOBS)
    wait_until("every workflow completed", lambda: sql.fetchval(
        "SELECT count(*) FROM jobd.jobs WHERE state = 'completed'") == n, timeout=90,
        daemons=(daemon,))
    assert sql.fetchval("SELECT count(*) FROM jobd.job_steps WHERE finished_at IS NOT NULL") \
        == n * steps
    rows = sql.fetch("SELECT name, result::text AS r FROM jobd.job_steps")
    assert all(r["r"] == str(int(r["name"][1:]) ** 2) for r in rows)


def test_a_step_result_postgres_refuses_fails_only_its_workflow(jobd, sql, tmp_path):
    """A NUL byte in one workflow's step result fails that step's statement; the step
    writer writes that batch again row by row, so only that workflow fails, with the
    reason, while the others sharing its statements complete. A 2 MB result is stored
    like any other. The daemon stays up."""
    daemon = jobd(modules=MODULES, queues={"wf": {"concurrency": 40}}, jobs=JOBS)
    acks = tmp_path / "acks"
    sql.execute("INSERT INTO jobd.jobs (kind, queue, args) SELECT 'wf.acked', 'wf', $1::jsonb"
                " FROM generate_series(1, 30)",
                json.dumps({"acks": str(acks), "steps": 20}))
    bad = int(daemon.jobctl("enqueue", "wf.unstorable", "--args", '{"what": "nul"}').stdout)
    big = int(daemon.jobctl("enqueue", "wf.unstorable", "--args", '{"what": "big"}').stdout)
    wait_until("every workflow finished", lambda: sql.fetchval(
        "SELECT count(*) FROM jobd.jobs WHERE state IN ('completed', 'failed')") == 32,
        daemons=(daemon,))
    rows = {r["id"]: r for r in sql.fetch(
        "SELECT id, kind, state, result::text AS result, errors::text AS errors"
        " FROM jobd.jobs")}
    assert rows[bad]["state"] == "failed"
    assert "bad value" in rows[bad]["errors"], rows[bad]["errors"]
    assert (rows[big]["state"], rows[big]["result"]) == ("completed", f'"{2 << 20} chars"')
    acked = [r for r in rows.values() if r["kind"] == "wf.acked"]
    assert all(r["state"] == "completed" for r in acked)
    assert sql.fetchval("SELECT count(*) FROM jobd.job_steps WHERE job_id = $1"
                        " AND finished_at IS NOT NULL", bad) == 1  # "fine" only
    assert sql.fetchval("SELECT count(*) FROM jobd.job_steps WHERE finished_at IS NOT NULL"
                        " AND job_id <> ALL($1::bigint[])", [bad, big]) == 30 * 20
    assert daemon.proc.poll() is None
    assert daemon.jobctl_json("ping")["ready"]
