"""The reaper against rows no CHECK kept out (issue 14, item 13): an insane timeout_s on
a running job no longer fails the expire statement for every row (it fails that job as
invalid_value), and a step Postgres refuses is contained: logged once, counted, the
other steps run."""

from __future__ import annotations

import logging
from datetime import timedelta

import msgspec
import pytest

from actors.ports import NewJob, NullObserver
from actors.runtime.clock import TrioClock
from actors.runtime.mailbox import Mailbox
from actors.services.reaper import AgingRule, Reaper, ReaperSettings, RetentionRule, Sweep

INSANE = [float("nan"), float("inf"), float("-inf"), 1e308, 1e16, -5.0, 0.0]


class Counting(NullObserver):
    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []

    def maintenance_error(self, actor: str, step: str) -> None:
        self.errors.append((actor, step))


def secs(n: float) -> timedelta:
    return timedelta(seconds=n)


def drop_timeout_checks(sql) -> None:
    """Helper d's migration 0008 adds CHECKs on timeout_s: this is about a row from
    before them (or with one dropped), so remove whatever would stop the write."""
    for row in sql.fetch(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'jobd.jobs'::regclass"
            " AND contype = 'c' AND pg_get_constraintdef(oid) ILIKE '%timeout_s%'"):
        sql.execute(f'ALTER TABLE jobd.jobs DROP CONSTRAINT "{row["conname"]}"')


async def running(store, sql, timeout_s: float | None, max_attempts: int = 3):
    [done] = await store.enqueue_many([NewJob(kind="k", max_attempts=max_attempts,
                                              timeout_s=1.0)])
    t0 = (await store.get_job(done.id))["run_at"] + secs(1)
    [job] = await store.claim("default", 1, "d1", 3600, ["k"], now=t0)
    sql.execute("UPDATE jobd.jobs SET timeout_s = $2 WHERE id = $1", job.id, timeout_s)
    return job, t0


async def due_later(store, sql) -> None:
    """A scheduled job whose time has come: the promote step makes it available."""
    [done] = await store.enqueue_many([NewJob(kind="later", delay_s=600)])
    sql.execute("UPDATE jobd.jobs SET run_at = now() - interval '1 minute' WHERE id = $1",
                done.id)


def errors(row) -> list[dict]:
    return msgspec.json.decode(row["errors"])


async def test_expire_fails_an_insane_timeout_and_still_times_out_the_sane(store, sql):
    drop_timeout_checks(sql)
    insane = [(await running(store, sql, bad))[0] for bad in INSANE]
    sane, t0 = await running(store, sql, 10.0)
    untimed, _ = await running(store, sql, None)
    now = t0 + secs(3600)
    swept = await store.expire_overdue(100, 5, now=now)
    assert sorted((s.id, s.state) for s in swept) == sorted(
        [(j.id, "failed") for j in insane] + [(sane.id, "available")])
    for job in insane:
        row = await store.get_job(job.id)
        assert (row["state"], row["finished_at"], row["timeout_s"], row["lease_owner"]) == (
            "failed", now, None, None)
        [error] = errors(row)
        assert error["class"] == "invalid_value" and "timeout_s" in error["message"]
    row = await store.get_job(sane.id)
    assert (row["state"], errors(row)[0]["class"]) == ("available", "timeout")
    assert (await store.get_job(untimed.id))["state"] == "running"
    assert await store.expire_overdue(100, 5, now=now) == []


async def test_a_sweep_fails_the_insane_rows_and_does_everything_else(store, sql):
    drop_timeout_checks(sql)
    bad, _ = await running(store, sql, float("nan"))
    worse, _ = await running(store, sql, 1e308)
    await due_later(store, sql)
    reaper = Reaper(Mailbox[Sweep]("reaper"), store, ReaperSettings(), observer=NullObserver(),
                    clock=TrioClock())
    report = await reaper.sweep()
    assert (report.timed_out, report.promoted, report.failed_steps) == (2, 1, [])
    states = dict(sql.fetch("SELECT id, state FROM jobd.jobs"))
    assert (states[bad.id], states[worse.id]) == ("failed", "failed")


async def test_a_step_postgres_refuses_is_contained_and_the_others_run(store, sql, caplog):
    """Aging with an interval Postgres cannot hold ("interval out of range", a DataError
    the bridge turns into ValueRejected) fails its step on every pass; the steps before
    and after it still run, it is logged once and counted each time."""
    [waiting] = await store.enqueue_many([NewJob(kind="w", queue="aged", priority=5)])
    sql.execute("UPDATE jobd.jobs SET run_at = now() - interval '1 day' WHERE id = $1",
                waiting.id)
    await due_later(store, sql)  # promote runs before
    [old] = await store.enqueue_many([NewJob(kind="done")])  # prune runs after
    sql.execute("UPDATE jobd.jobs SET state = 'completed', finished_at = now() - interval"
                " '2 days' WHERE id = $1", old.id)
    observer = Counting()
    settings = ReaperSettings(aging=[AgingRule(queue="aged", every_s=1e308, floor=0)],
                              retention=[RetentionRule("completed", 3600.0, 1000)])
    reaper = Reaper(Mailbox[Sweep]("reaper"), store, settings, observer=observer,
                    clock=TrioClock())
    caplog.set_level(logging.INFO, "jobd.reaper")
    first = await reaper.sweep()
    assert (first.failed_steps, first.promoted, first.pruned) == (["age"], 1, 1)
    second = await reaper.sweep()
    assert second.failed_steps == ["age"]
    assert observer.errors == [("reaper", "age")] * 2
    failed = [r for r in caplog.records if r.__dict__.get("event") == "reaper.step_failed"]
    assert len(failed) == 1 and "out of range" in failed[0].getMessage()
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE id = $1", old.id) == 0
    # Fixed (here: the rule changed), the step works again and says so once.
    reaper.settings.aging = [AgingRule(queue="aged", every_s=3600.0, floor=0)]
    assert (await reaper.sweep()).failed_steps == []
    assert [r.__dict__["step"] for r in caplog.records
            if r.__dict__.get("event") == "reaper.step_recovered"] == ["age"]


@pytest.mark.parametrize("bad", [float("nan"), 1e308])
async def test_the_reaper_actor_survives_insane_rows_on_its_timer(store, sql, bad):
    """The actor's own loop (not only handle()): timed passes with the row there."""
    import trio

    drop_timeout_checks(sql)
    job, _ = await running(store, sql, bad)
    reaper = Reaper(Mailbox[Sweep]("reaper"), store, ReaperSettings(interval_s=0.05),
                    observer=NullObserver(), clock=TrioClock())
    with trio.move_on_after(1.0):
        await reaper.run()  # raised on its first pass before
    assert (await store.get_job(job.id))["state"] == "failed"
