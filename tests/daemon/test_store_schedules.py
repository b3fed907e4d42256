"""Schedules against a real Postgres, on a pinned `now`: definitions, exactly-once
firing between concurrent schedulers, missed-run policies, jitter, and children that a
handler enqueues once per key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import trio

import examples.basic  # noqa: F401 - registers the `noop` kind the schedules fire
from actors.handlers import HANDLERS
from actors.ports import FireTarget, NewJob, NullObserver
from actors.runtime.mailbox import Mailbox
from actors.schedule import jitter_offset, unique_key
from actors.schedule_jobs import definition, occurrence
from actors.services.schedule_commands import trigger
from actors.services.scheduler import Scheduler, SchedulerSettings
from daemon.store import PgStore
from protocol.schedules import ScheduleSpec

T0 = datetime(2025, 10, 14, 4, 0, 0, tzinfo=UTC)


def secs(n: float) -> timedelta:
    return timedelta(seconds=n)


def spec(name: str = "tick", **options) -> ScheduleSpec:
    if "cron" not in options:
        options.setdefault("every", "1s")
    return ScheduleSpec(name=name, kind="noop", **options)


def scheduler(store) -> Scheduler:
    return Scheduler(Mailbox("scheduler"), store, SchedulerSettings(), handlers=HANDLERS, config_schedules=list,
                     observer=NullObserver(), clock=None)  # type: ignore[arg-type]


async def jobs_of(sql, name: str = "tick") -> list[tuple[datetime, str, str]]:
    rows = sql.fetch("SELECT f.fire_at, j.unique_key, j.state FROM jobd.schedule_fires f"
                     " JOIN jobd.jobs j ON j.id = f.job_id WHERE f.schedule = $1"
                     " ORDER BY f.fire_at", name)
    return [(r["fire_at"], r["unique_key"], r["state"]) for r in rows]


# --------------------------------------------------------------------------- definitions


async def test_add_list_pause_resume_remove(store):
    row = await store.put_schedule(definition(HANDLERS, spec(cron="0 6 * * *", tz="Europe/Berlin",
                                                   args={})), replace=False, now=T0)
    assert (row.name, row.cron, row.tz, row.paused, row.revision) == (
        "tick", "0 6 * * *", "Europe/Berlin", False, 1)
    assert row.handled_until == T0  # a new schedule starts now: no backfill
    # A second add of the name is refused; replace overwrites.
    assert await store.put_schedule(definition(HANDLERS, spec()), replace=False) is None
    now, rows = await store.list_schedules(now=T0)
    assert now == T0 and [r.name for r in rows] == ["tick"]

    paused = await store.set_schedule_paused("tick", True, now=T0 + secs(10))
    assert paused.paused and paused.handled_until == T0
    resumed = await store.set_schedule_paused("tick", False, now=T0 + secs(3600))
    # What came due while paused does not fire: the watermark moves to the resume time.
    assert not resumed.paused and resumed.handled_until == T0 + secs(3600)

    assert await store.delete_schedule("tick") is True
    assert await store.delete_schedule("tick") is False
    assert await store.set_schedule_paused("tick", True) is None
    assert (await store.list_schedules(now=T0))[1] == []


async def test_replace_bumps_the_revision_only_when_the_definition_changes(store):
    await store.put_schedule(definition(HANDLERS, spec(), source="config"), replace=True, now=T0)
    same = await store.put_schedule(definition(HANDLERS, spec(), source="config"), replace=True,
                                    now=T0 + secs(50))
    # A daemon restart re-declaring the same schedule keeps its watermark (missed runs
    # are still found), and the revision.
    assert (same.revision, same.handled_until, same.source) == (1, T0, "config")
    changed = await store.put_schedule(definition(HANDLERS, spec(every="5s"), source="config"),
                                       replace=True, now=T0 + secs(60))
    assert (changed.revision, changed.every_s, changed.handled_until) == (2, 5.0, T0 + secs(60))


# --------------------------------------------------------------------------- exactly once


async def test_two_schedulers_fire_each_occurrence_once(store, fresh_database, sql):
    await store.put_schedule(definition(HANDLERS, spec()), replace=False, now=T0)
    other = PgStore(fresh_database, pool_min=1, pool_max=4, timeout_s=10)
    await other.connect()
    try:
        a, b = scheduler(store), scheduler(other)
        reports = []
        for step in range(1, 11):
            now = T0 + secs(step)
            # Both daemons see the same due occurrence and race for it.
            async with trio.open_nursery() as nursery:
                for s in (a, b, a, b):
                    async def tick(s=s, now=now):
                        reports.append(await s.tick(now))
                    nursery.start_soon(tick)
    finally:
        await other.close()
    fires = await jobs_of(sql)
    assert [f for f, _, _ in fires] == [T0 + secs(i) for i in range(1, 11)]
    assert [k for _, k, _ in fires] == [unique_key("tick", T0 + secs(i)) for i in range(1, 11)]
    assert sum(r.fired for r in reports) == 10
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 10
    assert all(r.next_in_s is not None and 0 < r.next_in_s <= 1 for r in reports)


async def test_a_finished_job_does_not_let_its_occurrence_fire_again(store, sql):
    """Unique keys only dedupe unfinished jobs; the fires table covers the rest."""
    await store.put_schedule(definition(HANDLERS, spec()), replace=False, now=T0)
    row = (await store.list_schedules(now=T0))[1][0]
    s = scheduler(store)
    assert (await s.tick(T0 + secs(1))).fired == 1
    sql.execute("UPDATE jobd.jobs SET state = 'completed', finished_at = now()")
    # A daemon that read the schedule before that fire (stale watermark) fires the same
    # occurrence: regular and manual paths both create nothing.
    occ = occurrence(HANDLERS, row, T0 + secs(1))
    fired, refused = await store.fire_schedules([FireTarget("tick", 1, T0 + secs(1))], [occ],
                                                now=T0 + secs(1))
    assert (fired, refused) == ([], set())
    manual = occurrence(HANDLERS, row, T0 + secs(1), manual=True)
    assert (await store.fire_schedules([FireTarget("tick", 1, None)], [manual]))[0] == []
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 1


async def test_a_redefined_or_paused_schedule_refuses_a_stale_fire(store, sql):
    await store.put_schedule(definition(HANDLERS, spec()), replace=False, now=T0)
    row = (await store.list_schedules(now=T0))[1][0]
    await store.put_schedule(definition(HANDLERS, spec(every="2s")), replace=True, now=T0)
    occ = occurrence(HANDLERS, row, T0 + secs(1))
    fired, refused = await store.fire_schedules([FireTarget("tick", row.revision, T0 + secs(1))],
                                                [occ], now=T0 + secs(1))
    assert (fired, refused) == ([], {"tick"})
    await store.set_schedule_paused("tick", True, now=T0)
    assert (await scheduler(store).tick(T0 + secs(30))).fired == 0
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 0


async def test_trigger_fires_now_even_when_paused(store, sql):
    await store.put_schedule(definition(HANDLERS, spec(cron="0 6 * * *")), replace=False, now=T0)
    await store.set_schedule_paused("tick", True)
    done = await trigger(store, HANDLERS, "tick", None)
    assert done.created and done.job_id is not None
    job = await store.get_job(done.job_id)
    assert job["state"] == "available" and job["unique_key"] == unique_key("tick", done.fire_at)
    assert f"fire:{done.fire_at.isoformat()}" in job["tags"]
    # Naming the occurrence: a second trigger of the same one creates nothing.
    at = datetime(2025, 10, 14, 6, 0, tzinfo=UTC)
    assert (await trigger(store, HANDLERS, "tick", at)).created
    again = await trigger(store, HANDLERS, "tick", at)
    assert (again.created, again.job_id) == (False, None)
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 2
    row = (await store.list_schedules())[1][0]
    assert row.last_fire_at == max(done.fire_at, at)
    assert row.handled_until == T0  # manual fires leave the watermark alone


# --------------------------------------------------------------------------- missed runs


async def down_since(store, sql, policy: str, **options) -> list[datetime]:
    """A one-minute schedule whose daemons were all down from 01:00 to 04:00:30."""
    await store.put_schedule(definition(HANDLERS, spec(every="1m", missed=policy, grace="10s", **options)),
                             replace=False, now=T0 - secs(3 * 3600))
    report = await scheduler(store).tick(T0 + secs(30))
    fires = [f for f, _, _ in await jobs_of(sql)]
    assert report.fired == len(fires)
    assert (await store.list_schedules())[1][0].handled_until == T0 + secs(30)
    return fires


async def test_missed_skip(store, sql):
    assert await down_since(store, sql, "skip") == []


async def test_missed_latest(store, sql):
    assert await down_since(store, sql, "latest") == [T0]


async def test_missed_all_is_bounded(store, sql):
    fires = await down_since(store, sql, "all", missed_limit=5)
    assert fires == [T0 - secs(60 * i) for i in (4, 3, 2, 1, 0)]


async def test_on_time_fires_under_skip(store, sql):
    await store.put_schedule(definition(HANDLERS, spec(every="1m", missed="skip", grace="10s")),
                             replace=False, now=T0 - secs(3 * 3600))
    assert (await scheduler(store).tick(T0 + secs(5))).fired == 1
    assert [f for f, _, _ in await jobs_of(sql)] == [T0]


# --------------------------------------------------------------------------- jitter


async def test_jitter_delays_the_job_not_the_occurrence(store, sql):
    await store.put_schedule(definition(HANDLERS, spec(every="1m", jitter="30s")), replace=False,
                             now=T0 - secs(1))
    assert (await scheduler(store).tick(T0)).fired == 1
    [(fire_at, key, state)] = await jobs_of(sql)
    assert fire_at == T0 and key == unique_key("tick", T0) and state == "scheduled"
    run_at = sql.fetchval("SELECT run_at FROM jobd.jobs")
    offset = (run_at - T0).total_seconds()
    assert 0 <= offset < 30
    assert abs(offset - jitter_offset("tick", T0, 30.0)) < 1e-5


# --------------------------------------------------------------------------- prune, children


async def test_prune_keeps_recent_fires(store, sql):
    await store.put_schedule(definition(HANDLERS, spec()), replace=False, now=T0)
    s = scheduler(store)
    for i in range(1, 4):
        await s.tick(T0 + secs(i))
    sql.execute("UPDATE jobd.schedule_fires SET fired_at = $1 WHERE fire_at < $2",
                T0 - timedelta(days=8), T0 + secs(3))
    assert await s.prune(now=T0) == 2
    assert sql.fetchval("SELECT count(*) FROM jobd.schedule_fires") == 1


async def test_children_are_created_once_per_key_even_after_finishing(store, sql):
    [parent] = await store.enqueue_many([NewJob(kind="noop")])
    children = [NewJob(kind="noop", unique_key=f"c:{i}", tags=["2025-10-14"]) for i in range(3)]
    first = await store.enqueue_children(parent.id, children + [children[0]])
    assert [d.created for d in first] == [True, True, True, False]
    assert first[3].id == first[0].id
    sql.execute("UPDATE jobd.jobs SET state = 'completed', finished_at = now()"
                " WHERE unique_key = 'c:0'")
    again = await store.enqueue_children(parent.id, children)
    assert [d.created for d in again] == [False, False, False]
    assert [d.id for d in again] == [d.id for d in first[:3]]
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE parent_id = $1", parent.id) == 3
    row = await store.get_job(first[0].id)
    assert msgspec.json.decode(row["args"]) == {}


async def test_a_daemon_killed_while_holding_the_fire_leaves_no_gap(store, sql):
    """A daemon dies mid-fire (its session holds the schedule's lock, then the server
    ends it): the waiting daemon fires the occurrence, exactly once."""
    await store.put_schedule(definition(HANDLERS, spec()), replace=False, now=T0)
    s = scheduler(store)

    def locker() -> None:
        try:
            sql.fetch("WITH held AS (SELECT name FROM jobd.schedules WHERE name = 'tick'"
                      " FOR UPDATE) SELECT pg_sleep(30) FROM held")
        except Exception:  # noqa: BLE001 - terminated on purpose
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, locker)
        await trio.sleep(0.3)
        reports = []

        async def tick() -> None:
            reports.append(await s.tick(T0 + secs(1)))

        nursery.start_soon(tick)
        await trio.sleep(0.3)
        assert reports == []  # blocked behind the dying daemon's lock
        await trio.to_thread.run_sync(sql.execute,
                                      "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                      " WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()")
    assert reports[0].fired == 1
    assert [f for f, _, _ in await jobs_of(sql)] == [T0 + secs(1)]
    assert (await s.tick(T0 + secs(1))).fired == 0


async def test_children_keep_every_field_of_their_spec(store, sql):
    """Children (fan-out and workflow spawns) travel like top-level jobs: cost included."""
    [parent] = await store.enqueue_many([NewJob(kind="noop")])
    spec = NewJob(kind="noop", args='{"s": "a\\"b"}', queue="q2", key="acme", priority=4,
                  max_attempts=7, tags=["x", "y z"], timeout_s=1.5, cost=9)
    [fanned] = await store.enqueue_children(parent.id, [spec])
    [spawned] = await store.spawn_children(parent.id, "spawn#1", [spec])
    for job_id in (fanned.id, spawned):
        [row] = sql.fetch(
            "SELECT args::text AS args, queue, key, priority, max_attempts, tags, timeout_s,"
            " cost, parent_id FROM jobd.jobs WHERE id = $1", job_id)
        assert dict(row) == {"args": '{"s": "a\\"b"}', "queue": "q2", "key": "acme",
                             "priority": 4, "max_attempts": 7, "tags": ["x", "y z"],
                             "timeout_s": 1.5, "cost": 9, "parent_id": parent.id}
