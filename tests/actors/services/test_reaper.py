"""Maintenance statements (rescue, expire, promote, prune) and one Reaper.sweep() pass.

Statement tests pin `now`; the sweep test uses real time only where the outcome
cannot depend on it (leases that expired before the sweep began, start times an
hour in the past).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from actors.ports import NewJob, NullObserver, Outcome
from actors.runtime.clock import TrioClock
from actors.runtime.mailbox import Mailbox
from actors.services.reaper import Reaper, ReaperSettings, RetentionRule, Sweep, SweepReport


def secs(n: float) -> timedelta:
    return timedelta(seconds=n)


async def running_job(store, *, owner: str = "d1", lease_s: float = 30.0, **options):
    """Enqueue and claim one job; returns (claimed, the pinned claim time)."""
    [done] = await store.enqueue_many([NewJob(kind="k", **options)])
    t0 = (await store.get_job(done.id))["run_at"] + secs(1)
    [job] = await store.claim("default", 1, owner, lease_s, ["k"], now=t0)
    assert job.id == done.id
    return job, t0


def errors(row) -> list[dict]:
    return msgspec.json.decode(row["errors"])


# --------------------------------------------------------------------------- rescue


async def test_expired_lease_is_rescued_back_to_available(store):
    job, t0 = await running_job(store, owner="dead-daemon", lease_s=30)
    assert await store.rescue_expired(100, now=t0 + secs(29)) == []
    assert await store.rescue_expired(100, now=t0 + secs(30)) == []  # lease_until is not < now
    [swept] = await store.rescue_expired(100, now=t0 + secs(31))
    assert (swept.id, swept.state, swept.kind, swept.queue) == (job.id, "available", "k",
                                                                "default")
    row = await store.get_job(job.id)
    assert (row["state"], row["lease_owner"], row["lease_until"]) == ("available", None, None)
    assert row["run_at"] == t0 + secs(31)
    assert row["finished_at"] is None
    [error] = errors(row)
    assert (error["class"], error["attempt"], error["duration_s"]) == ("rescued", 1, 31)
    assert "dead-daemon" in error["message"]
    # The token moved on: the lost attempt's finish is fenced out ...
    late = Outcome(id=job.id, token=job.lease_token, state="completed")
    assert await store.finish_many([late]) == set()
    # ... and the next claim gets a newer token still.
    [again] = await store.claim("default", 1, "d2", 30, ["k"], now=t0 + secs(32))
    assert (again.attempt, again.lease_token) == (2, job.lease_token + 2)


async def test_rescue_fails_a_job_out_of_attempts(store):
    job, t0 = await running_job(store, max_attempts=1)
    [swept] = await store.rescue_expired(100, now=t0 + secs(60))
    assert swept.state == "failed"
    row = await store.get_job(job.id)
    assert (row["state"], row["finished_at"]) == ("failed", t0 + secs(60))
    assert [e["class"] for e in errors(row)] == ["rescued"]


async def test_rescue_cancels_a_job_whose_cancel_was_requested(store):
    job, t0 = await running_job(store, max_attempts=5)
    assert await store.cancel(job.id) == ("running", "cancelling")
    [swept] = await store.rescue_expired(100, now=t0 + secs(60))
    assert swept.state == "cancelled"
    row = await store.get_job(job.id)
    assert (row["state"], row["finished_at"]) == ("cancelled", t0 + secs(60))


async def test_rescue_works_in_batches_oldest_lease_first(store):
    jobs = [(await running_job(store, lease_s=10 + i))[0] for i in range(3)]
    [_, t0] = await running_job(store, lease_s=10_000)
    later = t0 + secs(1000)
    first = await store.rescue_expired(2, now=later)
    second = await store.rescue_expired(2, now=later)
    assert {s.id for s in first} == {jobs[0].id, jobs[1].id}
    assert [s.id for s in second] == [jobs[2].id]
    assert await store.rescue_expired(2, now=later) == []


async def test_heartbeat_renews_leases_and_keeps_them_from_rescue(store):
    job, t0 = await running_job(store, owner="alive", lease_s=30)
    await store.register_daemon("alive", "r", "h", 1, "v")
    assert await store.heartbeat("alive", 30, "ok", False, now=t0 + secs(25),
                                 running=[(job.id, job.lease_token)]) == []  # none lost
    assert await store.rescue_expired(100, now=t0 + secs(45)) == []
    assert len(await store.rescue_expired(100, now=t0 + secs(56))) == 1


async def test_heartbeat_does_not_renew_an_attempt_the_daemon_lost(store):
    # A restarted dispatcher loses its attempts while the daemon lives on: only the
    # attempts still running are renewed, so the lost one lapses and is rescued.
    kept, t0 = await running_job(store, owner="alive", lease_s=30)
    lost, _ = await running_job(store, owner="alive", lease_s=30)
    await store.register_daemon("alive", "r", "h", 1, "v")
    lost_here = await store.heartbeat("alive", 30, "ok", False, now=t0 + secs(25),
                                      running=[(kept.id, kept.lease_token)])
    assert lost_here == []
    rescued = await store.rescue_expired(100, now=t0 + secs(45))
    assert [r.id for r in rescued] == [lost.id]


# --------------------------------------------------------------------------- timeouts, promotion


async def test_expire_overdue_after_timeout_plus_grace(store):
    job, t0 = await running_job(store, lease_s=3600, timeout_s=10, max_attempts=3)
    assert await store.expire_overdue(100, 5, now=t0 + secs(15)) == []
    [swept] = await store.expire_overdue(100, 5, now=t0 + secs(16))
    assert (swept.id, swept.state) == (job.id, "available")
    row = await store.get_job(job.id)
    assert (row["state"], row["lease_owner"], row["run_at"]) == ("available", None,
                                                                 t0 + secs(16))
    [error] = errors(row)
    assert (error["class"], error["duration_s"]) == ("timeout", 16)
    assert await store.finish_many(
        [Outcome(id=job.id, token=job.lease_token, state="completed")]) == set()


async def test_expire_overdue_fails_the_last_attempt_and_ignores_untimed_jobs(store):
    job, t0 = await running_job(store, lease_s=3600, timeout_s=1, max_attempts=1)
    untimed, _ = await running_job(store, lease_s=3600)
    swept = await store.expire_overdue(100, 0, now=t0 + secs(3000))
    assert [(s.id, s.state) for s in swept] == [(job.id, "failed")]
    assert (await store.get_job(job.id))["finished_at"] == t0 + secs(3000)
    assert (await store.get_job(untimed.id))["state"] == "running"


async def test_promote_due(store):
    [done] = await store.enqueue_many([NewJob(kind="k", delay_s=60)])
    due = (await store.get_job(done.id))["run_at"]
    assert await store.promote_due(100, now=due - secs(1)) == 0
    assert await store.promote_due(100, now=due) == 1
    assert (await store.get_job(done.id))["state"] == "available"
    assert await store.promote_due(100, now=due) == 0


# --------------------------------------------------------------------------- retention


async def finished_jobs(store, sql, state: str, finished_at: list[datetime]) -> list[int]:
    """Jobs in a final `state`, finished at the given (pinned) times."""
    ids = []
    for at in finished_at:
        job, _ = await running_job(store)
        assert await store.finish_many(
            [Outcome(id=job.id, token=job.lease_token, state=state)]) == {job.id}
        sql.execute("UPDATE jobd.jobs SET finished_at = $2 WHERE id = $1", job.id, at)
        ids.append(job.id)
    return ids


def remaining(sql) -> set[int]:
    return {r["id"] for r in sql.fetch("SELECT id FROM jobd.jobs")}


async def test_prune_by_age(store, sql):
    now = datetime.fromisoformat("2030-01-01T00:00:00+00:00")
    old = await finished_jobs(store, sql, "completed", [now - secs(s) for s in (100, 50)])
    new = await finished_jobs(store, sql, "completed", [now - secs(s) for s in (29, 1)])
    failed = await finished_jobs(store, sql, "failed", [now - secs(1000)])
    live, _ = await running_job(store)
    assert await store.prune_finished("completed", 30, 1000, 100, now=now) == 2
    assert remaining(sql) == {*new, *failed, live.id}
    assert await store.prune_finished("completed", 30, 1000, 100, now=now) == 0
    assert set(old).isdisjoint(remaining(sql))


async def test_prune_by_count_keeps_the_newest_n_in_small_batches(store, sql):
    now = datetime.fromisoformat("2030-01-01T00:00:00+00:00")
    ids = await finished_jobs(store, sql, "completed", [now - secs(s) for s in (5, 4, 3, 2, 1)])
    others = await finished_jobs(store, sql, "cancelled", [now - secs(s) for s in (9, 8, 7)])
    deleted = [await store.prune_finished("completed", 10**9, 2, 2, now=now) for _ in range(3)]
    assert deleted == [2, 1, 0]
    assert remaining(sql) == {ids[3], ids[4], *others}


async def test_prune_with_fewer_jobs_than_the_count_deletes_nothing(store, sql):
    now = datetime.fromisoformat("2030-01-01T00:00:00+00:00")
    await finished_jobs(store, sql, "failed", [now - secs(1), now - secs(2)])
    assert await store.prune_finished("failed", 10**9, 2, 100, now=now) == 0
    assert await store.prune_finished("failed", 10**9, 0, 100, now=now) == 2


async def test_prune_keeps_children_while_their_parent_is_unfinished(store, sql):
    """Fan-in: a waiting parent gathers its children's rows when it wakes, so retention
    must not take them first, however old and however many other jobs finished since."""
    now = datetime.fromisoformat("2030-01-01T00:00:00+00:00")
    [p] = await store.enqueue_many([NewJob(kind="wf")])
    [parent] = await store.claim("default", 1, "d1", 30.0, ["wf"])
    kids = await store.spawn_children(p.id, "spawn#1", [NewJob(kind="child")] * 3)
    await store.finish_many([Outcome(id=p.id, token=parent.lease_token, state="waiting",
                                     refund=1)])
    for _ in kids:
        [child] = await store.claim("default", 1, "d1", 30.0, ["child"])
        await store.finish_many([Outcome(id=child.id, token=child.lease_token,
                                         state="completed", result="1")])
    sql.execute("UPDATE jobd.jobs SET finished_at = $2 WHERE id = ANY($1)", kids,
                now - secs(10**6))
    # Newer unrelated completions push the children past the count, and past the age.
    others = await finished_jobs(store, sql, "completed", [now - secs(s) for s in (3, 2, 1)])
    assert sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", p.id) == "waiting"
    assert await store.prune_finished("completed", 60, 2, 100, now=now) == 1  # others[0] only
    assert remaining(sql) == {p.id, *kids, *others[1:]}
    # Woken and running again (the attempt that gathers): still kept.
    sql.execute("UPDATE jobd.jobs SET state = 'available' WHERE id = $1", p.id)
    [parent] = await store.claim("default", 1, "d1", 30.0, ["wf"])
    assert await store.prune_finished("completed", 60, 2, 100, now=now) == 0
    assert set(kids) <= remaining(sql)
    # Once the parent has finished, its children are ordinary finished jobs.
    await store.finish_many([Outcome(id=p.id, token=parent.lease_token, state="completed")])
    sql.execute("UPDATE jobd.jobs SET finished_at = $2 WHERE id = $1", p.id, now - secs(1))
    assert await store.prune_finished("completed", 60, 3, 100, now=now) == 3
    assert remaining(sql) == {p.id, *others[1:]}


async def test_prune_events_keeps_what_a_live_waiter_needs(store, sql):
    # Sent before the wait began: no use to the waiter.
    before, _ = await store.send_event("approval", '{"order": 1}')
    sql.execute("UPDATE jobd.events SET sent_at = sent_at - interval '1 hour'")
    [w] = await store.enqueue_many([NewJob(kind="wf")])
    [waiter] = await store.claim("default", 1, "d1", 30.0, ["wf"])
    await store.begin_wait(w.id, waiter.lease_token, "event:approval", "approval",
                           '{"order": 1}', None)
    await store.finish_many([Outcome(id=w.id, token=waiter.lease_token, state="waiting",
                                     refund=1)])
    assert sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", w.id) == "waiting"
    await store.send_event("other", "{}")  # no waiter for its name
    await store.send_event("approval", '{"order": 2}')  # the waiter's match says no
    # The one the waiter waits for: it wakes the job, which has yet to re-run and read it.
    needed, woken = await store.send_event("approval", '{"order": 1, "ok": true}')
    assert woken == [w.id]
    recent, _ = await store.send_event("other", "{}")
    now = datetime.now(UTC) + timedelta(days=10)
    sql.execute("UPDATE jobd.events SET sent_at = $2 WHERE id = $1", recent, now - secs(60))

    def events() -> set[int]:
        return {r["id"] for r in sql.fetch("SELECT id FROM jobd.events")}

    week = 7 * 86400.0
    assert await store.prune_events(week, 2, now=now) == 2  # batches of 2
    assert await store.prune_events(week, 2, now=now) == 1
    assert await store.prune_events(week, 2, now=now) == 0
    assert events() == {needed, recent}
    # Re-run (it consumes the event) and finished: the event is no longer needed.
    [rerun] = await store.claim("default", 1, "d1", 30.0, ["wf"])
    await store.finish_many([Outcome(id=w.id, token=rerun.lease_token, state="completed")])
    assert await store.prune_events(week, 100, now=now) == 1
    assert events() == {recent}
    assert await store.prune_events(30.0, 100, now=now) == 1
    # The reaper's pass runs it (jobs.retention.events_max_age).
    late, _ = await store.send_event("late", "{}")
    sql.execute("UPDATE jobd.events SET sent_at = now() - interval '1 day' WHERE id = $1", late)
    reaper = Reaper(Mailbox[Sweep]("reaper"), store, ReaperSettings(events_max_age_s=3600.0),
                    observer=NullObserver(), clock=TrioClock())
    assert (await reaper.sweep()).pruned_events == 1
    assert events() == set()


# --------------------------------------------------------------------------- one sweep


async def test_sweep_reports_what_it_did(store, sql):
    # Three leases that expired before the sweep starts (negative lease), one of them on
    # its last attempt.
    for max_attempts in (3, 3, 1):
        await store.enqueue_many([NewJob(kind="lease", max_attempts=max_attempts)])
    expired = await store.claim("default", 10, "gone", -1, ["lease"])
    assert len(expired) == 3
    # One attempt started an hour ago with a 10 s timeout, its lease still renewed.
    [done] = await store.enqueue_many([NewJob(kind="slow", delay_s=-7200, timeout_s=10)])
    hour_ago = (await store.get_job(done.id))["run_at"] + secs(3600)
    [overdue] = await store.claim("default", 1, "stuck", 7200, ["slow"], now=hour_ago)
    # One retry whose time has already come.
    await store.enqueue_many([NewJob(kind="retry")])
    [retry] = await store.claim("default", 1, "d", 30, ["retry"])
    await store.finish_many([Outcome(id=retry.id, token=retry.lease_token, state="scheduled",
                                     delay_s=-60)])
    # Three completed jobs, of which retention keeps the newest one.
    await store.enqueue_many([NewJob(kind="done") for _ in range(3)])
    finished = await store.claim("default", 3, "d", 30, ["done"])
    await store.finish_many([Outcome(id=j.id, token=j.lease_token, state="completed")
                             for j in finished])
    sql.execute("UPDATE jobd.jobs SET finished_at = finished_at - (id || ' s')::interval"
                " WHERE state = 'completed'")

    settings = ReaperSettings(batch=2, timeout_grace_s=0, retention=[
        RetentionRule(state="completed", max_age_s=10**9, max_count=1)])
    reaper = Reaper(Mailbox[Sweep]("reaper"), store, settings, observer=NullObserver(),
                    clock=TrioClock())
    report = await reaper.sweep()
    assert report == SweepReport(rescued=3, failed_on_rescue=1, timed_out=1, promoted=1,
                                 pruned=2)

    states = dict(sql.fetch("SELECT id, state FROM jobd.jobs"))
    assert sorted(states[j.id] for j in expired) == ["available", "available", "failed"]
    assert states[overdue.id] == "available"
    assert states[retry.id] == "available"
    assert [i for i, s in states.items() if s == "completed"] == [min(j.id for j in finished)]
    # A second pass finds nothing left to do.
    assert await reaper.sweep() == SweepReport()


async def test_a_held_sweep_rescues_nothing_until_the_hold_ends(store, sql):
    """After an outage the daemon holds outcomes whose leases lapsed meanwhile: its reaper
    waits (the app's hold) until its heart has renewed them."""
    await store.enqueue_many([NewJob(kind="lease") for _ in range(2)])
    expired = await store.claim("default", 10, "here", -1, ["lease"])
    hold: list[str | None] = ["waiting for this daemon's leases to be renewed"]
    reaper = Reaper(Mailbox[Sweep]("reaper"), store, ReaperSettings(), observer=NullObserver(),
                    clock=TrioClock(), hold=lambda: hold[0])
    assert (await reaper.sweep()).rescued == 0
    assert {s for (s,) in sql.fetch("SELECT state FROM jobd.jobs")} == {"running"}
    # The lease token still matches: the fenced finish applies though lease_until passed.
    first = expired[0]
    assert await store.finish_many([Outcome(id=first.id, token=first.lease_token,
                                            state="completed")]) == {first.id}
    hold[0] = None
    assert (await reaper.sweep()).rescued == 1
    assert dict(sql.fetch("SELECT id, state FROM jobd.jobs")) == {
        first.id: "completed", expired[1].id: "available"}


async def test_a_hold_that_never_ends_does_not_starve_rescue(store):
    """A store that fails now and then (a statement timing out) keeps the app's hold
    reason alive; after max_hold_s of sweeps that reached the database, rescue goes on."""
    await store.enqueue_many([NewJob(kind="lease")])
    await store.claim("default", 10, "gone", -1, ["lease"])
    reaper = Reaper(Mailbox[Sweep]("reaper"), store,
                    ReaperSettings(interval_s=1.0, max_hold_s=2.0), observer=NullObserver(),
                    clock=TrioClock(), hold=lambda: "always")
    assert [(await reaper.sweep()).rescued for _ in range(3)] == [0, 0, 1]
async def test_sweep_prunes_idle_flow_keys(store, sql):
    # (issue 14, item 7) flow_keys grew by a row per key ever seen and was never pruned.
    sql.execute("INSERT INTO jobd.flow_keys (queue, key, served_at) "
                "SELECT 'crawl', 'user-' || g, now() - interval '1 hour' "
                "FROM generate_series(1, 2500) g")
    await store.enqueue_many([NewJob(kind="k", queue="crawl", key="user-7")])  # has work
    settings = ReaperSettings(batch=1000, idle_key_after_s=600)
    reaper = Reaper(Mailbox[Sweep]("reaper"), store, settings, observer=NullObserver(),
                    clock=TrioClock())
    assert (await reaper.sweep()).keys_pruned == 2499
    assert [r["key"] for r in sql.fetch("SELECT key FROM jobd.flow_keys WHERE key <> ''")] == [
        "user-7"]
