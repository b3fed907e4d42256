"""The workflow statements (daemon/store/workflows.py) and their triggers, on Postgres."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec
import pytest

from actors.ports import LeaseLost, NewJob, Outcome, StepRow, ValueRejected


async def claim_one(store, queue: str = "default", kinds: list[str] | None = None):
    [job] = await store.claim(queue, 1, "d1", 30.0, kinds or ["wf", "child"])
    return job


async def test_steps_save_load_first_writer_wins(store):
    [e] = await store.enqueue_many([NewJob(kind="wf")])
    job = await claim_one(store)
    assert await store.load_steps(e.id) == []
    assert await store.save_step(e.id, job.lease_token, "a", '{"x": 1}', 1, 0.01) == '{"x": 1}'
    # A second completion (the same step run twice at once) keeps the first result.
    assert await store.save_step(e.id, job.lease_token, "a", '{"x": 2}', 1, 0.01) == '{"x": 1}'
    await store.save_step_error(e.id, "b", '{"class": "network"}', 3)
    steps = {n: (r, d) for n, r, d in await store.load_steps(e.id)}
    assert steps == {"a": ('{"x": 1}', True), "b": (None, False)}
    # An errored step completes later; attempts add up.
    assert await store.save_step(e.id, job.lease_token, "b", "7", 1, 0.0) == "7"


async def test_a_step_of_an_attempt_that_lost_its_lease_is_not_stored(store, sql):
    [e] = await store.enqueue_many([NewJob(kind="wf")])
    job = await claim_one(store)
    with pytest.raises(LeaseLost):  # a zombie: another attempt holds the job
        await store.save_step(e.id, job.lease_token - 1, "a", "1", 1, 0.0)
    await store.finish_many([Outcome(id=e.id, token=job.lease_token, state="completed",
                                     result="1")])
    with pytest.raises(LeaseLost):  # finished: nothing holds it
        await store.save_step(e.id, job.lease_token, "a", "1", 1, 0.0)
    assert sql.fetchval("SELECT count(*) FROM jobd.job_steps") == 0


async def test_save_steps_many_rows_one_statement_each_its_own_outcome(store, sql):
    """Many attempts' steps in one call: each row answers for itself, in order."""
    enqueued = await store.enqueue_many([NewJob(kind="wf") for _ in range(60)])
    jobs = {c.id: c for c in await store.claim("default", 60, "d1", 30.0, ["wf"])}
    assert len(jobs) == 60
    first = enqueued[0].id
    await store.save_step(first, jobs[first].lease_token, "done", '"old"', 1, 0.0)
    rows = [StepRow(e.id, jobs[e.id].lease_token, "s", json.dumps({"i": i}), 1, 0.01)
            for i, e in enumerate(enqueued)]
    lost = StepRow(enqueued[1].id, jobs[enqueued[1].id].lease_token + 7, "t", "1", 1, 0.0)
    again = StepRow(first, jobs[first].lease_token, "done", '"new"', 1, 0.0)
    twice = [StepRow(first, jobs[first].lease_token, "dup", str(n), 1, 0.0) for n in (1, 2)]
    out = await store.save_steps([*rows, lost, again, *twice])
    assert [json.loads(r) for r in out[:60]] == [{"i": i} for i in range(60)]
    assert out[60:] == [None, '"old"', "1", "1"]
    assert sql.fetchval("SELECT count(*) FROM jobd.job_steps WHERE name = 's'") == 60
    assert sql.fetchval("SELECT count(*) FROM jobd.job_steps WHERE name = 't'") == 0
    assert sql.fetchval("SELECT attempts FROM jobd.job_steps WHERE job_id = $1"
                        " AND name = 'dup'", first) == 1


async def test_save_steps_a_refused_value_fails_the_statement(store, sql):
    """A NUL byte (jsonb cannot hold one) is ValueRejected for the whole statement, and
    nothing of it is stored: the step writer then writes the rows apart."""
    [a, b] = await store.enqueue_many([NewJob(kind="wf"), NewJob(kind="wf")])
    jobs = {c.id: c for c in await store.claim("default", 2, "d1", 30.0, ["wf"])}
    rows = [StepRow(a.id, jobs[a.id].lease_token, "s", "1", 1, 0.0),
            StepRow(b.id, jobs[b.id].lease_token, "s", '"\\u0000"', 1, 0.0)]
    with pytest.raises(ValueRejected):
        await store.save_steps(rows)
    assert sql.fetchval("SELECT count(*) FROM jobd.job_steps") == 0
    assert await store.save_steps(rows[:1]) == ["1"]
    with pytest.raises(ValueRejected):
        await store.save_steps(rows[1:])


async def test_sleep_until_is_fixed_by_first_call(store):
    [e] = await store.enqueue_many([NewJob(kind="wf")])
    assert await store.begin_sleep(e.id, "sleep:s", 1000.5) == 1000.5
    assert await store.begin_sleep(e.id, "sleep:s", 2000.0) == 1000.5


async def test_spawn_is_atomic_and_once(store, sql):
    [e] = await store.enqueue_many([NewJob(kind="wf")])
    kids = [NewJob(kind="child", args='{"n": 1}'), NewJob(kind="child", args='{"n": 2}')]
    ids = await store.spawn_children(e.id, "spawn#1", kids)
    assert len(ids) == 2
    again = await store.spawn_children(e.id, "spawn#1", kids)
    assert again == ids
    rows = sql.fetch("SELECT id, parent_id FROM jobd.jobs WHERE parent_id = $1 ORDER BY id", e.id)
    assert [r["id"] for r in rows] == ids


async def test_gather_wait_and_wake_by_trigger(store, sql):
    [e] = await store.enqueue_many([NewJob(kind="wf")])
    parent = await claim_one(store)
    ids = await store.spawn_children(e.id, "spawn#1", [NewJob(kind="child"), NewJob(kind="child")])
    waiting_on = json.dumps({"type": "children", "ids": ids})
    rows = await store.gather_children(e.id, parent.lease_token, waiting_on, ids)
    assert {r["state"] for r in rows} == {"available"}
    await store.finish_many([Outcome(id=e.id, token=parent.lease_token, state="waiting", refund=1)])
    assert sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", e.id) == "waiting"
    assert sql.fetchval("SELECT attempt FROM jobd.jobs WHERE id = $1", e.id) == 0
    for _ in ids:
        child = await claim_one(store, kinds=["child"])
        await store.finish_many([Outcome(id=child.id, token=child.lease_token, state="completed",
                                         result='{"ok": true}')])
    # The last child's finish woke the parent, in the same statement.
    assert sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", e.id) == "available"


async def test_waiting_with_condition_already_met_goes_available(store, sql):
    [e] = await store.enqueue_many([NewJob(kind="wf")])
    parent = await claim_one(store)
    [kid] = await store.spawn_children(e.id, "spawn#1", [NewJob(kind="child")])
    await store.gather_children(e.id, parent.lease_token,
                                json.dumps({"type": "children", "ids": [kid]}), [kid])
    sql.execute("UPDATE jobd.jobs SET state = 'completed' WHERE id = $1", kid)
    await store.finish_many([Outcome(id=e.id, token=parent.lease_token, state="waiting", refund=1)])
    assert sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", e.id) == "available"


async def test_events_wake_matching_waiters(store, sql):
    [a, b] = await store.enqueue_many([NewJob(kind="wf"), NewJob(kind="wf")])
    ja, jb = await claim_one(store), await claim_one(store)
    wait, data, now = await store.begin_wait(a.id, ja.lease_token, "event:x", "approved",
                                             '{"id": 1}', None)
    assert data is None and json.loads(wait)["deadline"] is None
    await store.begin_wait(b.id, jb.lease_token, "event:x", "approved", '{"id": 2}', 60.0)
    await store.finish_many([Outcome(id=j.id, token=j.lease_token, state="waiting", refund=1)
                             for j in (ja, jb)])
    _, woken = await store.send_event("approved", '{"id": 1, "by": "ann"}')
    assert woken == [a.id]
    states = dict(sql.fetch("SELECT id, state FROM jobd.jobs ORDER BY id"))
    assert states == {a.id: "available", b.id: "waiting"}
    # A re-run finds the event.
    ja2 = await claim_one(store)
    _, data, _ = await store.begin_wait(a.id, ja2.lease_token, "event:x", "approved",
                                        '{"id": 1}', None)
    assert msgspec.json.decode(data) == {"id": 1, "by": "ann"}


async def test_wait_timeout_woken_by_sweep(store, sql):
    [a] = await store.enqueue_many([NewJob(kind="wf")])
    ja = await claim_one(store)
    await store.begin_wait(a.id, ja.lease_token, "event:x", "never", "{}", 0.2)
    await store.finish_many([Outcome(id=a.id, token=ja.lease_token, state="waiting", refund=1)])
    assert await store.wake_waiting(100) == []
    sql.execute("SELECT pg_sleep(0.25)")
    assert await store.wake_waiting(100) == [a.id]


async def test_cancel_cascades_to_children(store, sql):
    [e] = await store.enqueue_many([NewJob(kind="wf")])
    ids = await store.spawn_children(e.id, "spawn#1", [NewJob(kind="child")] * 3)
    grandkids = await store.spawn_children(ids[1], "spawn#1", [NewJob(kind="child")])
    running = await claim_one(store, kinds=["child"])
    assert await store.cancel(e.id) == ("available", "cancelled")
    states = dict(sql.fetch("SELECT id, state FROM jobd.jobs WHERE id <> $1", e.id))
    assert states[running.id] == "running"
    assert sql.fetchval("SELECT cancel_requested FROM jobd.jobs WHERE id = $1", running.id)
    others = [i for i in [*ids, *grandkids] if i != running.id]
    assert all(states[i] == "cancelled" for i in others)


async def test_failure_hook_enqueued_with_the_failure(store, sql):
    await store.register_failure_hooks(["wf"])
    [e] = await store.enqueue_many([NewJob(kind="wf"), ])
    job = await claim_one(store)
    await store.finish_many([Outcome(id=e.id, token=job.lease_token, state="failed",
                                     error='{"class": "fail"}')])
    rows = sql.fetch("SELECT kind, args::text, unique_key FROM jobd.jobs WHERE kind = 'jobd.on_failure'")
    assert len(rows) == 1 and json.loads(rows[0]["args"]) == {"job_id": e.id}


async def test_workflow_details(store):
    [e] = await store.enqueue_many([NewJob(kind="wf")])
    job = await claim_one(store)
    await store.save_step(e.id, job.lease_token, "a", "1", 2, 0.5)
    await store.spawn_children(e.id, "spawn#1", [NewJob(kind="child")])
    waiting_on, steps, children = await store.workflow_details(e.id)
    assert waiting_on is None
    steps = json.loads(steps)
    assert [s["name"] for s in steps] == ["a", "spawn#1"] and steps[0]["attempts"] == 2
    assert datetime.fromisoformat(steps[0]["finished_at"]) <= datetime.now(UTC)
    assert [c["kind"] for c in json.loads(children)] == ["child"]


async def test_overhead_numbers(store):
    """Prints the cost of a step write, a step load and a suspend/resume (README numbers)."""
    import time

    [e] = await store.enqueue_many([NewJob(kind="wf")])
    job = await claim_one(store)
    n = 200
    t = time.perf_counter()
    for i in range(n):
        await store.save_step(e.id, job.lease_token, f"s{i}", '{"v": 1}', 1, 0.0)
    write_us = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    rows = await store.load_steps(e.id)
    load_ms = (time.perf_counter() - t) * 1e3
    assert len(rows) == n
    # suspend (sleep) + resume at store level: claim, begin_sleep, finish(scheduled),
    # claim again (due), load_steps. Claims and finishes are batched in the daemon.
    jobs = await store.enqueue_many([NewJob(kind="wf") for _ in range(50)])
    t = time.perf_counter()
    for _ in jobs:
        c = await claim_one(store)
        await store.begin_sleep(c.id, "sleep:x", 0.0)
        await store.finish_many([Outcome(id=c.id, token=c.lease_token, state="scheduled",
                                         delay_s=0.0, refund=1)])
        again = await claim_one(store)
        await store.load_steps(again.id)
        await store.finish_many([Outcome(id=again.id, token=again.lease_token,
                                         state="completed", result="1")])
    cycle_ms = (time.perf_counter() - t) / len(jobs) * 1e3
    print(f"\nstep write {write_us:.0f} us (1 round trip); load of {n} steps {load_ms:.2f} ms "
          f"(1 round trip); suspend+resume+finish cycle {cycle_ms:.2f} ms (6 round trips "
          f"unbatched, of which claim x2 and finish x2 are batched in the daemon)")


async def test_a_suspension_is_recorded_by_its_finish(store, sql):
    """Sleeps and waits travel with the finish that suspends (one statement for many
    jobs); only attempts that still hold their lease record anything."""
    jobs = await store.enqueue_many([NewJob(kind="wf") for _ in range(3)])
    sleeper, waiter, zombie = [await claim_one(store) for _ in jobs]
    until = datetime.now(UTC).timestamp() + 3600
    await store.finish_many([
        Outcome(id=sleeper.id, token=sleeper.lease_token, state="scheduled", delay_s=3600.0,
                refund=1, steps=json.dumps([{"name": "sleep:nap", "until": until}])),
        Outcome(id=waiter.id, token=waiter.lease_token, state="waiting", refund=1,
                steps=json.dumps([{"name": "event:ok", "wait": True, "timeout_s": 60.0}]),
                waiting_on=json.dumps({"type": "event", "name": "ok", "match": {"n": 1},
                                       "step": "event:ok", "timeout_s": 60.0})),
        Outcome(id=zombie.id, token=zombie.lease_token + 1, state="scheduled", delay_s=9.0,
                refund=1, steps=json.dumps([{"name": "sleep:nap", "until": until}])),
    ])
    assert await store.load_steps(sleeper.id) == [("sleep:nap", json.dumps({"until": until}), True)]
    assert await store.begin_sleep(sleeper.id, "sleep:nap", until + 99) == until
    assert await store.load_steps(zombie.id) == []  # fenced: its lease was not this
    row = sql.fetch("SELECT state, attempt, waiting_on::text, started_at FROM jobd.jobs"
                    " WHERE id = $1", waiter.id)[0]
    assert (row["state"], row["attempt"]) == ("waiting", 0)
    waiting_on = json.loads(row["waiting_on"])
    assert waiting_on["since"] == row["started_at"].timestamp()
    assert 59 < waiting_on["deadline"] - datetime.now(UTC).timestamp() <= 60
    assert "timeout_s" not in waiting_on
    [(name, wait, done)] = await store.load_steps(waiter.id)
    assert not done and json.loads(wait) == {k: waiting_on[k] for k in ("since", "deadline")}
    # The event wakes it; the re-run's begin_wait finds the event and the same deadline.
    _, woken = await store.send_event("ok", '{"n": 1}')
    assert woken == [waiter.id]
    again = await claim_one(store)
    wait, data, _ = await store.begin_wait(waiter.id, again.lease_token, "event:ok", "ok",
                                           '{"n": 1}', 60.0)
    assert json.loads(data) == {"n": 1}
    assert json.loads(wait) == {k: waiting_on[k] for k in ("since", "deadline")}


async def test_an_event_sent_during_the_attempt_answers_its_wait(store, sql):
    [e] = await store.enqueue_many([NewJob(kind="wf")])
    job = await claim_one(store)
    await store.send_event("ok", '{"n": 2}')  # after the claim, before the finish
    await store.finish_many([Outcome(
        id=e.id, token=job.lease_token, state="waiting", refund=1,
        steps=json.dumps([{"name": "event:ok", "wait": True, "timeout_s": None}]),
        waiting_on=json.dumps({"type": "event", "name": "ok", "match": {"n": 2},
                               "step": "event:ok", "timeout_s": None}))])
    # The before-wait trigger saw it: the job never waits.
    assert sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", e.id) == "available"


async def test_children_finished_before_the_suspension_wake_it_at_once(store, sql):
    [e] = await store.enqueue_many([NewJob(kind="wf")])
    parent = await claim_one(store)
    [kid] = await store.spawn_children(e.id, "spawn#1", [NewJob(kind="child")])
    child = await claim_one(store, kinds=["child"])
    await store.finish_many([Outcome(id=kid, token=child.lease_token, state="completed",
                                     result="1")])
    await store.finish_many([Outcome(
        id=e.id, token=parent.lease_token, state="waiting", refund=1,
        waiting_on=json.dumps({"type": "children", "ids": [kid], "step": "gather#1"}))])
    assert sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", e.id) == "available"


async def test_a_refused_suspension_fails_the_job(store, sql):
    from actors.services.outcomes import refused_outcome

    [e] = await store.enqueue_many([NewJob(kind="wf")])
    job = await claim_one(store)
    bad = Outcome(id=e.id, token=job.lease_token, state="scheduled", delay_s=5.0, refund=1,
                  steps=json.dumps([{"name": "sleep:\u0000", "until": 1.0}]))
    with pytest.raises(ValueRejected) as refused:
        await store.finish_many([bad])
    await store.finish_many([refused_outcome(bad, refused.value)])  # as the completer does
    assert sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", e.id) == "failed"


async def test_a_marked_jobs_claim_returns_its_steps(store, sql):
    """A job whose finish said it has steps gets them with its next claim (both claim
    statements); a job's first claim gets none (no attempt before it can have stored
    one); other jobs get None and load on first use."""
    from actors.flow import FlowLimits, KeyLimits

    [wf, plain] = await store.enqueue_many([NewJob(kind="wf"), NewJob(kind="plain")])
    job = await claim_one(store)
    await store.save_step(wf.id, job.lease_token, "a", '{"x": 1}', 1, 0.0)
    await store.save_step_error(wf.id, "b", '{"class": "network"}', 1)
    await store.finish_many([Outcome(id=wf.id, token=job.lease_token, state="available",
                                     delay_s=0.0, steps="[]")])
    claimed = {c.kind: c for c in await store.claim("default", 10, "d1", 30.0, ["wf", "plain"])}
    assert claimed["plain"].steps == "[]"  # its first claim
    assert sorted(json.loads(claimed["wf"].steps)) == [["a", {"x": 1}, True], ["b", None, False]]
    # Unmarked and claimed before (e.g. a crash after a step, before the finish): unknown.
    await store.finish_many([Outcome(id=plain.id, token=claimed["plain"].lease_token,
                                     state="available", delay_s=0.0)])
    [plain_again] = await store.claim("default", 10, "d1", 30.0, ["plain"])
    assert plain_again.steps is None
    # A finish without steps keeps the mark; under flow control the claim says the same.
    await store.finish_many([Outcome(id=wf.id, token=claimed["wf"].lease_token,
                                     state="available", delay_s=0.0)])
    [again] = await store.claim("default", 10, "d1", 30.0, ["wf"],
                               limits=FlowLimits(default=KeyLimits(concurrency=10), keys={}))
    assert sorted(json.loads(again.steps)) == sorted(json.loads(claimed["wf"].steps))


async def test_a_jobs_steps_go_with_it_on_retention_and_on_delete(store, sql):
    """Steps have no foreign key (migration 0022): a trigger on jobs deletes them, once
    per statement, for the retention prune and for `jobctl delete` alike, and only the
    deleted jobs' steps."""
    from protocol.commands import Delete

    enqueued = await store.enqueue_many([NewJob(kind="wf") for _ in range(3)])
    jobs = {c.id: c for c in await store.claim("default", 3, "d1", 30.0, ["wf"])}
    await store.save_steps([StepRow(e.id, jobs[e.id].lease_token, name, "1", 1, 0.0)
                            for e in enqueued for name in ("a", "b")])
    await store.finish_many([Outcome(id=e.id, token=jobs[e.id].lease_token,
                                     state="completed", result="1") for e in enqueued])
    pruned, deleted, kept = (e.id for e in enqueued)
    sql.execute("UPDATE jobd.jobs SET finished_at = now() - interval '2 days' WHERE id = $1",
                pruned)
    assert await store.prune_finished("completed", 86400.0, 1000, 100) == 1
    assert await store.delete_matching(Delete(ids=[deleted]), dry_run=False) == (1, 1)
    left = sql.fetch("SELECT job_id, name FROM jobd.job_steps ORDER BY job_id, name")
    assert [(r["job_id"], r["name"]) for r in left] == [(kept, "a"), (kept, "b")]
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 1
