"""Handlers for the fault harnesses (tests/e2e/test_faults.py, bench/soak.py).

Loaded with `handlers.modules = ["tests.e2e.fault_handlers"]`. The effect is recorded
OUTSIDE Postgres, so no database fault can hide or undo it: every attempt appends one
line to the file named by `$JOBD_FAULT_EFFECTS` (O_APPEND, one `write` per line, so the
lines of concurrent attempts and of several daemons never interleave):

    <job_id> <attempt> <lease_token> <pid> <started_at> <effect_at>

(times are `time.time()` seconds). The job then completes through the completer, so a
fault between the effect and the completion's commit shows up as a second effect of the
same job (at-least-once), with a different attempt and lease token.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec
import trio

from actors import Context, job
from daemon.embedded import EmbeddedPostgres

EFFECTS_ENV = "JOBD_FAULT_EFFECTS"


class FaultEffectArgs(msgspec.Struct):
    hold_s: float = 0.0


@job("fault_effect", queue="faults", max_attempts=50)
async def fault_effect(ctx: Context, args: FaultEffectArgs) -> dict:
    started = time.time()
    if args.hold_s:
        await trio.sleep(args.hold_s)
    line = (f"{ctx.job.id} {ctx.job.attempt} {ctx._token} {os.getpid()} "
            f"{started:.6f} {time.time():.6f}\n").encode()
    fd = os.open(os.environ[EFFECTS_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return {"attempt": ctx.job.attempt}


class Effect(msgspec.Struct, frozen=True):
    job_id: int
    attempt: int
    token: int
    pid: int
    started_at: float
    effect_at: float


def read_effects(path: str | os.PathLike[str]) -> list[Effect]:
    """Parse the effects file; a torn last line (a daemon SIGKILLed mid-write) is skipped."""
    effects = []
    try:
        text = open(path, encoding="ascii").read()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 6:
            continue
        effects.append(Effect(int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3]),
                              float(parts[4]), float(parts[5])))
    return effects


# --------------------------------------------------------------------------- analysis


class Fault(msgspec.Struct):
    """One injected fault: from `started_at` (wall clock) until the daemon was ready again."""

    kind: str
    started_at: float
    ended_at: float
    detail: str = ""


class Analysis(msgspec.Struct):
    jobs: int
    effects: int
    lost: list[int]  # jobs without any effect
    not_completed: dict[int, str]  # job id -> state
    attempt_twice: list[tuple[int, int, int]]  # (job, attempt, token) with >1 effect
    duplicate_jobs: int  # jobs with more than one effect
    duplicate_effects: int  # effects beyond the first, over all jobs
    attributed: int  # extra effects whose attempt was in flight at a fault
    attributed_by_kind: dict[str, int]  # ... by the kind of the latest such fault
    # Extra effects whose attempt had finished before it was rescued: an outcome that was
    # produced but never written (held in memory, or lost with the daemon), as opposed to
    # an attempt still running when its lease was taken (its finish then fenced).
    finished_before_rescue: int
    unattributed: list[str]  # extra effects with no fault to explain them (bugs)
    error_classes: dict[str, int]  # every attempt error seen, by class


RESCUE_SLACK_S = 0.5  # the rescue's `at` and the handler's clock are the same machine's


def analyse(effects: list[Effect], jobs: dict[int, tuple[str, int, list[dict]]],
            faults: list[Fault]) -> Analysis:
    """Check the effects against the jobs' final rows and the fault windows.

    `jobs`: id -> (state, final attempt, errors). The rule for duplicates: the effect of
    the attempt that completed the job is the one that counts; every other effect of a
    job belongs to an attempt whose completion was never written. Such an attempt was
    necessarily rescued (the reaper's `rescued` error for that attempt number records
    when; a drain's release records its own error), so the write it never made was lost somewhere in [attempt started, rescued].
    A fault window must intersect that interval, or the duplicate is unexplained: a bug.
    """
    by_job: dict[int, list[Effect]] = {}
    seen: dict[tuple[int, int, int], int] = {}
    for e in effects:
        by_job.setdefault(e.job_id, []).append(e)
        seen[(e.job_id, e.attempt, e.token)] = seen.get((e.job_id, e.attempt, e.token), 0) + 1
    classes: dict[str, int] = {}
    for _, _, errors in jobs.values():
        for err in errors:
            classes[err.get("class", "?")] = classes.get(err.get("class", "?"), 0) + 1
    attributed, unattributed, by_kind, held = 0, [], {}, 0
    for job_id, mine in by_job.items():
        if len(mine) < 2 or job_id not in jobs:
            continue
        _, final_attempt, errors = jobs[job_id]
        # The rescue (or, for a drained daemon, the release) that ended each attempt.
        rescues: dict[Any, dict] = {}
        for err in errors:
            if err.get("class") == "rescued" or err.get("attempt") not in rescues:
                rescues[err.get("attempt")] = err
        extra = [e for e in mine if e.attempt != final_attempt]
        if len(extra) < len(mine) - 1:  # the final attempt itself recorded twice
            extra = sorted(mine, key=lambda e: e.effect_at)[:-1]
        for e in extra:
            rescue = rescues.get(e.attempt)
            until = _epoch(rescue["at"]) + RESCUE_SLACK_S if rescue else float("inf")
            held += rescue is not None and e.effect_at < until - RESCUE_SLACK_S
            hit = [f for f in faults if f.started_at <= until and f.ended_at >= e.started_at]
            if rescue is not None and hit:
                attributed += 1
                kind = max(hit, key=lambda f: f.started_at).kind
                by_kind[kind] = by_kind.get(kind, 0) + 1
            else:
                unattributed.append(
                    f"job {job_id} attempt {e.attempt} token {e.token} pid {e.pid}: started "
                    f"{e.started_at:.3f}, effect {e.effect_at:.3f}, rescue "
                    f"{rescue['at'] if rescue else 'none'}, final attempt {final_attempt}; "
                    f"no fault window in between")
    return Analysis(
        jobs=len(jobs), effects=len(effects),
        lost=sorted(set(jobs) - set(by_job)),
        not_completed={i: s for i, (s, _, _) in jobs.items() if s != "completed"},
        attempt_twice=sorted(k for k, n in seen.items() if n > 1),
        duplicate_jobs=sum(1 for m in by_job.values() if len(m) > 1),
        duplicate_effects=sum(len(m) - 1 for m in by_job.values()),
        attributed=attributed, attributed_by_kind=by_kind, finished_before_rescue=held,
        unattributed=unattributed, error_classes=classes,
    )


def _epoch(at: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(at).timestamp()


# --------------------------------------------------------------------------- injection


class DurableCluster(EmbeddedPostgres):
    """A private cluster for fault tests: fsync off (the OS does not crash here) but every
    commit reaches the kernel before the client hears of it, so `restart -m immediate`
    loses nothing that was acknowledged (with `fast=True`'s synchronous_commit=off it
    would drop the last ~0.5 s of commits, and the harness itself would lose jobs)."""

    def _settings(self, sockdir: str) -> dict[str, str]:
        return {**super()._settings(sockdir), "fsync": "off", "full_page_writes": "off",
                "synchronous_commit": "on"}


def pg_restart(cluster: EmbeddedPostgres, mode: str) -> None:
    """`pg_ctl restart -m <mode>`: same options, same socket, so the same URL."""
    cluster._run("pg_ctl", "restart", "-m", mode, "-w", "-t", "60", "-D", str(cluster.datadir),
                 "-l", str(cluster.logfile))


def terminate_backends(cluster: EmbeddedPostgres, database: str) -> int:
    """pg_terminate_backend on every session of jobd's (application_name 'jobd')."""
    out = cluster.query("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        f" WHERE application_name = 'jobd' AND datname = '{database}'")
    return int(out.strip() or 0)
