"""Crash safety with the real daemon: SIGKILL at random moments loses no job, and an
attempt whose lease was taken away can never finish its job.

No timing assertions: every wait polls until a generous deadline. Each random run
prints its seed (shown on failure) so a failing kill schedule can be replayed with
JOBD_CRASH_SEED.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import support
from tests.e2e.crash_handlers import TABLES
from tests.support import JobdProcess, Sql

N_JOBS = 5_000
KILLS = 3
DEADLINE_S = 90.0
MODULES = ["examples.basic", "tests.e2e.crash_handlers"]
# Short leases and a fast reaper so a killed daemon's jobs come back within seconds;
# retention must keep every completed row for the final checks.
JOBS = {"lease": "2s", "reaper_interval": "0.5s", "poll_interval": "0.5s",
        "retention.completed_max_count": 1_000_000}


# --------------------------------------------------------------------------- helpers


def wait_until(what: str, predicate: Callable[[], Any], *, timeout: float = DEADLINE_S,
               daemons: tuple[JobdProcess, ...] = ()) -> Any:
    return support.wait_until(predicate, what, timeout=timeout, daemons=daemons)


def wait_for_dead_sessions(sql: Sql) -> None:
    """After a SIGKILL, wait until Postgres has ended every session of the dead daemon.

    A statement (or COMMIT) already sent when the process died still runs to its end on
    the server; only once those backends are gone is the jobs table settled.
    """
    wait_until("the killed daemon's database sessions to end", lambda: sql.fetchval(
        "SELECT count(*) = 0 FROM pg_stat_activity WHERE datname = current_database()"
        " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"), timeout=30)


def completed_count(sql: Sql) -> int:
    return sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE state = 'completed'")


def enqueue_batch(daemon: JobdProcess, directory: Path, kind: str, args: list[dict]) -> list[int]:
    path = directory / f"args-{kind}-{args[0]['name']}.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for a in args))
    out = daemon.jobctl_json("enqueue", kind, "--args-file", str(path))
    assert out["created"] == len(args)
    return out["ids"]


def error_classes(errors_json: str) -> list[str]:
    return [e["class"] for e in json.loads(errors_json)]


class CrashRun:
    """Drives one daemon at a time through N_JOBS jobs, SIGKILLing it KILLS times."""

    def __init__(self, jobd, sql: Sql, directory: Path, kind: str):
        self.jobd, self.sql, self.directory, self.kind = jobd, sql, directory, kind
        self.seed = int(os.environ.get("JOBD_CRASH_SEED") or random.randrange(1 << 30))
        self.rng = random.Random(self.seed)
        self.ids: list[int] = []
        # Per kill: the ids of jobs the killed daemon held (state running) once it was dead.
        self.running_at_kill: list[set[int]] = []

    def start(self) -> JobdProcess:
        return self.jobd(modules=MODULES, queues={"effects": {"concurrency": 50}}, jobs=JOBS)

    def run(self) -> None:
        args = [{"name": f"e{i}", "hold_s": round(self.rng.uniform(0.0, 0.02), 4)}
                for i in range(N_JOBS)]
        half = N_JOBS // 2
        # Cumulative completed counts at which to kill: each 10-25 % of the jobs further on.
        targets, at = [], 0
        for _ in range(KILLS):
            at += int(N_JOBS * self.rng.uniform(0.10, 0.25))
            targets.append(at)
        daemon = self.start()
        self.ids += enqueue_batch(daemon, self.directory, self.kind, args[:half])
        for n, target in enumerate(targets):
            daemon_id = daemon.jobctl_json("ping")["daemon_id"]
            # Kill once `target` jobs are done and the previous kill's jobs are all
            # rescued (so each kill interrupts only attempts of the daemon it kills).
            wait_until(f"{target} completed jobs (kill {n + 1}, seed {self.seed})",
                       lambda t=target, d=daemon_id: self.sql.fetchval(
                           "SELECT count(*) FILTER (WHERE state = 'completed') >= $1"
                           " AND count(*) FILTER (WHERE state = 'running'"
                           "                      AND lease_owner <> $2) = 0"
                           " FROM jobd.jobs", t, d),
                       daemons=(daemon,))
            time.sleep(self.rng.uniform(0.0, 0.2))  # land anywhere in the daemon's work
            daemon.kill()
            wait_for_dead_sessions(self.sql)
            rows = self.sql.fetch(
                "SELECT id, lease_owner FROM jobd.jobs WHERE state = 'running'")
            assert {r["lease_owner"] for r in rows} <= {daemon_id}
            self.running_at_kill.append({r["id"] for r in rows})
            daemon = self.start()  # same database, new process (and new daemon id)
            if n == 0:
                # The second half arrives at the restarted daemon while it rescues.
                self.ids += enqueue_batch(daemon, self.directory, self.kind, args[half:])
        assert len(set(self.ids)) == N_JOBS
        wait_until(f"all {N_JOBS} jobs completed (seed {self.seed})",
                   lambda: completed_count(self.sql) == N_JOBS, daemons=(daemon,))
        self.daemon = daemon

    def jobs(self) -> dict[int, Any]:
        rows = self.sql.fetch("SELECT id, state, attempt, max_attempts, lease_token,"
                              " errors::text AS errors FROM jobd.jobs")
        return {r["id"]: r for r in rows}

    def kills_while_running(self) -> Counter[int]:
        """How many of the kills each job was running at."""
        return Counter(i for running in self.running_at_kill for i in running)

    def check_jobs(self) -> tuple[dict[int, Any], Counter[int]]:
        """Checks shared by both variants; returns the job rows and kills_while_running."""
        jobs = self.jobs()
        assert sorted(jobs) == sorted(self.ids), "a job row went missing or appeared"
        assert Counter(r["state"] for r in jobs.values()) == {"completed": N_JOBS}
        hit = self.kills_while_running()
        # The runs really were interrupted: some attempts died with their daemon.
        assert hit, f"no job was running at any kill (seed {self.seed})"
        for job_id, row in jobs.items():
            classes = error_classes(row["errors"])
            # A kill costs exactly the attempts it interrupted: each one is rescued once
            # (class 'rescued'), nothing else goes wrong, and no job is rescued that the
            # dead daemon did not hold.
            assert classes == ["rescued"] * hit[job_id], (job_id, classes, hit[job_id], self.seed)
            # attempt counts every claim: one per rescue plus the one that completed.
            assert row["attempt"] == 1 + hit[job_id] <= 1 + KILLS, (job_id, row["attempt"])
            # The token moves once per claim and once per rescue.
            assert row["lease_token"] == row["attempt"] + hit[job_id], (job_id, dict(row))
            rescued_attempts = [e["attempt"] for e in json.loads(row["errors"])]
            assert rescued_attempts == list(range(1, row["attempt"])), (job_id, rescued_attempts)
        return jobs, hit


# --------------------------------------------------------------------------- SIGKILL


def test_sigkill_loses_nothing(jobd, sql, tmp_path):
    """5,000 `effect` jobs survive three random SIGKILLs with every effect exactly once."""
    # Created up front: the handler's own CREATE TABLE IF NOT EXISTS races with itself
    # at concurrency 50 (pg_type unique violation) and would add unrelated retries.
    sql.execute("CREATE TABLE effects ("
                " job_id bigint, name text, attempt int, at timestamptz DEFAULT now())")
    run = CrashRun(jobd, sql, tmp_path, "effect")
    run.run()
    jobs, hit = run.check_jobs()

    effects = sql.fetch("SELECT job_id, attempt FROM effects")
    # Every job's effect happened at least once...
    assert {e["job_id"] for e in effects} == set(jobs)
    # ...and exactly once. `effect` inserts its row and completes its job (tx.complete) in
    # ONE transaction: an attempt killed before COMMIT leaves neither the row nor the
    # completion (the rescue re-runs it), one killed after COMMIT leaves both (nothing to
    # rescue). A rescued attempt that kept running could not commit either, as its
    # completion is fenced by the lease token. So effects are effectively-once, even
    # though the job itself ran at-least-once.
    assert len(effects) == len(jobs), (
        f"duplicate effects: {[j for j, n in Counter(e['job_id'] for e in effects).items() if n > 1][:20]}"
    )
    # The effect that stuck is the one from the attempt that completed the job.
    for e in effects:
        assert e["attempt"] == jobs[e["job_id"]]["attempt"], (dict(e), run.seed)
    print(f"seed {run.seed}: running at each kill {[len(s) for s in run.running_at_kill]},"
          f" rescued jobs {len(hit)}")


def test_sigkill_plain_effects_duplicate_only_interrupted_jobs(jobd, sql, tmp_path):
    """A handler whose effect commits apart from its completion is at-least-once: a
    duplicate effect is possible only for a job the killed daemon was running."""
    sql.execute(TABLES["plain_effects"])
    run = CrashRun(jobd, sql, tmp_path, "plain_effect")
    run.run()
    jobs, hit = run.check_jobs()

    effects: dict[int, list[int]] = defaultdict(list)
    for e in sql.fetch("SELECT job_id, attempt FROM plain_effects ORDER BY job_id, attempt"):
        effects[e["job_id"]].append(e["attempt"])
    assert set(effects) == set(jobs), "some job's effect never happened"
    duplicated = {j for j, attempts in effects.items() if len(attempts) > 1}
    # Duplicates only where a kill interrupted the job between its effect and its
    # completion, i.e. only for jobs the dead daemon held as running.
    assert duplicated <= set(hit), (sorted(duplicated - set(hit))[:20], run.seed)
    for job_id, attempts in effects.items():
        final = jobs[job_id]["attempt"]
        # One effect per attempt at most; the completing attempt's is there, and any
        # other belongs to an attempt that was rescued.
        assert len(attempts) == len(set(attempts)), (job_id, attempts)
        assert final in attempts, (job_id, attempts, final)
        assert set(attempts) <= set(range(1, final + 1)), (job_id, attempts, final)
    print(f"seed {run.seed}: running at each kill {[len(s) for s in run.running_at_kill]},"
          f" rescued jobs {len(hit)}, duplicated effects {len(duplicated)}")


# --------------------------------------------------------------------------- zombies


def nap_events(sql: Sql, job_id: int) -> list[tuple[int, str]]:
    rows = sql.fetch("SELECT attempt, event FROM nap_log WHERE job_id = $1 ORDER BY at", job_id)
    return [(r["attempt"], r["event"]) for r in rows]


def job_row(sql: Sql, job_id: int) -> dict[str, Any]:
    row = sql.fetch("SELECT state, attempt, lease_token, lease_owner, result::text AS result,"
                    " errors::text AS errors, finished_at FROM jobd.jobs WHERE id = $1", job_id)
    return dict(row[0])


@pytest.mark.parametrize("finish", ["return", "tx"])
def test_zombie_cannot_finish(jobd, sql, finish):
    """A paused daemon whose lease was rescued wakes up and finishes its attempt: the
    finish (through the completer, or tx.complete) is fenced and changes nothing."""
    sql.execute(TABLES["nap_log"])
    sql.execute(TABLES["nap_release"])
    options = {"modules": MODULES, "jobs": JOBS}
    zombie = jobd(**options)
    zombie_id = zombie.jobctl_json("ping")["daemon_id"]
    job_id = int(zombie.jobctl("enqueue", "nap", "--args", json.dumps({"finish": finish})).stdout)
    wait_until("attempt 1 to start", lambda: (1, "started") in nap_events(sql, job_id),
               daemons=(zombie,))
    first = job_row(sql, job_id)
    assert (first["state"], first["attempt"], first["lease_owner"]) == ("running", 1, zombie_id)

    zombie.signal(signal.SIGSTOP)  # no more heartbeats: its lease runs out
    try:
        rescuer = jobd(**options)
        rescuer_id = rescuer.jobctl_json("ping")["daemon_id"]
        # The rescuer's reaper rescues the expired lease, then its dispatcher claims it.
        wait_until("attempt 2 to start on the second daemon",
                   lambda: (2, "started") in nap_events(sql, job_id), daemons=(rescuer,))
        second = job_row(sql, job_id)
        assert (second["state"], second["attempt"], second["lease_owner"]) == (
            "running", 2, rescuer_id)
        assert second["lease_token"] == first["lease_token"] + 2  # rescue + claim
        sql.execute("INSERT INTO nap_release VALUES ($1, 1)", job_id)
    finally:
        zombie.signal(signal.SIGCONT)

    # The zombie's attempt 1 now ends: stopped by its own heart, which finds the lease
    # gone, or (if it gets there first) finishing, fenced: with "tx" its tx.complete
    # must raise LeaseLost.
    ends = {"fenced", "returned", "completed_in_tx", "stopped"}
    wait_until("the zombie's attempt to end", lambda: any(
        a == 1 and e in ends for a, e in nap_events(sql, job_id)), daemons=(zombie,))
    [end] = [e for a, e in nap_events(sql, job_id) if a == 1 and e in ends]
    assert end in ("stopped", "fenced" if finish == "tx" else "returned")
    # SIGTERM drains the zombie: it writes whatever outcome it holds, then exits. After
    # that, everything it could do to the row is done.
    zombie.signal(signal.SIGTERM)
    assert zombie.wait(60) == 0, zombie.log_text()[-5000:]
    assert job_row(sql, job_id) == second, "the zombie's late finish changed the job"

    sql.execute("INSERT INTO nap_release VALUES ($1, 2)", job_id)
    wait_until("the job to complete",
               lambda: job_row(sql, job_id)["state"] == "completed", daemons=(rescuer,))
    final = job_row(sql, job_id)
    assert final["attempt"] == 2
    assert final["lease_owner"] is None
    assert json.loads(final["result"]) == {"pid": rescuer.proc.pid, "attempt": 2}
    errors = json.loads(final["errors"])
    assert [(e["class"], e["attempt"]) for e in errors] == [("rescued", 1)]
    assert zombie_id in errors[0]["message"]
