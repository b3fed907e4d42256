"""Two real daemons on one database share a queue without ever running the same attempt.

The `record_attempt` handler (tests/e2e/crash_handlers.py) commits a log row naming the
job, attempt, lease token and daemon pid BEFORE it completes the job, so a second run
of one attempt would leave a second row even though its completion would be fenced.
No timing assertions: every wait polls until a generous deadline.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests import support
from tests.e2e.crash_handlers import TABLES
from tests.support import JobdProcess, Sql

N_JOBS = 3_000
DEADLINE_S = 90.0
MODULES = ["tests.e2e.crash_handlers"]


def wait_until(what: str, predicate: Callable[[], Any], *, timeout: float = DEADLINE_S,
               daemons: tuple[JobdProcess, ...] = ()) -> Any:
    return support.wait_until(predicate, what, timeout=timeout, daemons=daemons)


def completed_count(sql: Sql) -> int:
    return sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE state = 'completed'")


@pytest.mark.parametrize("kill", [False, True], ids=["steady", "one_killed"])
def test_two_daemons_never_run_the_same_attempt(jobd, sql, fresh_database, tmp_path, kill):
    """steady: both daemons work, every job runs exactly once. one_killed: daemon A is
    SIGKILLed mid-run and restarted; B's and A's reapers race to rescue A's jobs, and
    still no attempt runs twice."""
    sql.execute(TABLES["attempt_log"])
    # A 10 s lease leaves no room for a spurious expiry on a slow box in the steady case;
    # after a kill, a 2 s lease gets A's jobs back quickly.
    jobs = {"lease": "2s" if kill else "10s", "reaper_interval": "0.5s",
            "poll_interval": "0.5s", "retention.completed_max_count": 1_000_000}
    options = {"modules": MODULES, "queues": {"shared": {"concurrency": 20}}, "jobs": jobs}
    # A is started by hand under its own application_name, so Postgres can tell its
    # sessions apart from B's once it is killed.
    a = JobdProcess(tmp_path / "a", with_app_name(fresh_database, "jobd-A"), **options)
    try:
        a.start()
        b = jobd(**options)
        _run(a, b, jobd, sql, options, tmp_path, kill)
    finally:
        a.kill()


def _run(a: JobdProcess, b: JobdProcess, jobd, sql: Sql, options: dict[str, Any],
         tmp_path, kill: bool) -> None:
    a_id = a.jobctl_json("ping")["daemon_id"]
    rng = random.Random()
    args_file = tmp_path / "args.jsonl"
    args_file.write_text("".join(json.dumps({"hold_s": round(rng.uniform(0, 0.01), 4)}) + "\n"
                                 for _ in range(N_JOBS)))
    ids = b.jobctl_json("enqueue", "record_attempt", "--args-file", str(args_file))["ids"]
    assert len(set(ids)) == N_JOBS

    pids = {a.proc.pid: "A", b.proc.pid: "B"}
    interrupted: set[int] = set()
    if kill:
        wait_until("A and B both working, 30 % done", lambda: sql.fetchval(
            "SELECT count(DISTINCT lease_owner) = 2 AND"
            " (SELECT count(*) FROM jobd.jobs WHERE state = 'completed') >= $1"
            " FROM jobd.jobs WHERE state = 'running'", N_JOBS * 3 // 10), daemons=(a, b))
        a.kill()
        # Statements A had already sent still run to their end on the server (a CLAIM
        # may still commit): read A's running jobs only once all its sessions are gone.
        wait_until("A's database sessions to end", lambda: sql.fetchval(
            "SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'jobd-A'"),
            timeout=30)
        interrupted = {r["id"] for r in sql.fetch(
            "SELECT id FROM jobd.jobs WHERE state = 'running' AND lease_owner = $1", a_id)}
        a2 = jobd(**options)
        pids[a2.proc.pid] = "A2"
        daemons = (b, a2)
    else:
        daemons = (a, b)
    wait_until(f"all {N_JOBS} jobs completed", lambda: completed_count(sql) == N_JOBS,
               daemons=daemons)

    rows = {r["id"]: r for r in sql.fetch(
        "SELECT id, state, attempt, lease_token, result::text AS result, errors::text AS errors"
        " FROM jobd.jobs")}
    assert sorted(rows) == sorted(ids)
    assert Counter(r["state"] for r in rows.values()) == {"completed": N_JOBS}
    log = sql.fetch("SELECT job_id, attempt, token, pid FROM attempt_log")

    # The invariant: no attempt (nor lease token) of any job ran twice.
    twice = [k for k, n in Counter((e["job_id"], e["attempt"]) for e in log).items() if n > 1]
    assert not twice, f"attempts run twice: {twice[:20]}"
    twice = [k for k, n in Counter((e["job_id"], e["token"]) for e in log).items() if n > 1]
    assert not twice, f"lease tokens run twice: {twice[:20]}"
    # Every attempt ran on one of our daemons, and both (all three) did a share.
    by_pid = Counter(e["pid"] for e in log)
    assert set(by_pid) <= set(pids), (by_pid, pids)
    assert all(by_pid[pid] > 0 for pid in pids), {pids[p]: by_pid[p] for p in pids}

    final = {(e["job_id"], e["attempt"]): e for e in log}
    for job_id, row in rows.items():
        entry = final.get((job_id, row["attempt"]))
        assert entry is not None, f"job {job_id}: completing attempt {row['attempt']} not logged"
        # The result was written by the attempt that logged itself with this token.
        assert json.loads(row["result"]) == {"pid": entry["pid"], "attempt": row["attempt"]}
        assert entry["token"] == row["lease_token"], (job_id, dict(row), dict(entry))
        classes = [e["class"] for e in json.loads(row["errors"])]
        if job_id in interrupted:
            # A's attempt died with A; one of the reapers rescued it exactly once.
            assert (row["attempt"], classes) == (2, ["rescued"]), (job_id, dict(row))
        else:
            assert (row["attempt"], classes) == (1, []), (job_id, dict(row))
    if kill:
        assert interrupted, "A was running nothing when it was killed"
    print({pids[p]: by_pid[p] for p in pids}, f"interrupted {len(interrupted)}")


def with_app_name(url: str, name: str) -> str:
    """The URL with an application_name (asyncpg passes unknown query keys as settings)."""
    return f"{url}{'&' if '?' in url else '?'}application_name={name}"
