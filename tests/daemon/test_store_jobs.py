"""PgStore's job statements against a real, migrated Postgres.

Time-sensitive claims take a pinned `now`, derived from the job's own run_at (set by
the database's clock at insert), so nothing here depends on how fast a query runs.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec
import pytest

from actors.ports import Enqueued, NewJob, Outcome, ProgressUpdate
from tests.support import generic_plan


def secs(n: float) -> timedelta:
    return timedelta(seconds=n)


async def run_at(store, job_id: int) -> datetime:
    row = await store.get_job(job_id)
    return row["run_at"]


async def claim_one(store, *, owner: str = "d1", kinds: tuple[str, ...] = ("k",),
                    lease_s: float = 30.0, now: datetime | None = None, limit: int = 1):
    return await store.claim("default", limit, owner, lease_s, list(kinds), now=now)


# --------------------------------------------------------------------------- enqueue


async def test_enqueue_one(store):
    [done] = await store.enqueue_many([NewJob(kind="k", args='{"a": 1}', key="acme",
                                              priority=2, max_attempts=4, tags=["x", "y z"],
                                              timeout_s=9.5)])
    assert done.created is True
    row = await store.get_job(done.id)
    assert (row["kind"], row["queue"], row["state"], row["attempt"]) == ("k", "default",
                                                                         "available", 0)
    assert msgspec.json.decode(row["args"]) == {"a": 1}
    assert (row["key"], row["priority"], row["max_attempts"], row["timeout_s"]) == (
        "acme", 2, 4, 9.5)
    assert list(row["tags"]) == ["x", "y z"]
    assert msgspec.json.decode(row["errors"]) == []


async def test_enqueue_batch_keeps_input_order(store):
    jobs = [NewJob(kind="k", args=f'{{"i": {i}}}') for i in range(50)]
    done = await store.enqueue_many(jobs)
    assert all(d.created for d in done)
    assert len({d.id for d in done}) == 50
    for i, d in enumerate(done):
        assert msgspec.json.decode((await store.get_job(d.id))["args"]) == {"i": i}
    assert await store.enqueue_many([]) == []
    assert await store.stats() == [("default", "available", 50)]


async def test_unique_key_dedupes_an_unfinished_job(store):
    [first] = await store.enqueue_many([NewJob(kind="k", unique_key="u1")])
    [again] = await store.enqueue_many([NewJob(kind="k", unique_key="u1", args='{"b": 2}')])
    assert again == Enqueued(id=first.id, created=False)
    assert msgspec.json.decode((await store.get_job(first.id))["args"]) == {}
    # While it runs, the key still holds.
    [claimed] = await claim_one(store)
    assert claimed.id == first.id
    [running] = await store.enqueue_many([NewJob(kind="k", unique_key="u1")])
    assert running == Enqueued(id=first.id, created=False)


async def test_unique_key_duplicates_within_one_batch_map_to_one_id(store):
    done = await store.enqueue_many([
        NewJob(kind="k", unique_key="a"), NewJob(kind="k", unique_key="b"),
        NewJob(kind="k", unique_key="a"), NewJob(kind="k"), NewJob(kind="k"),
    ])
    assert [d.created for d in done] == [True, True, False, True, True]
    assert done[2].id == done[0].id
    assert len({d.id for d in done}) == 4
    assert await store.stats() == [("default", "available", 4)]


async def test_unique_key_is_free_again_once_the_job_finished(store):
    for final in ("completed", "failed", "cancelled"):
        [first] = await store.enqueue_many([NewJob(kind="k", unique_key="u")])
        assert first.created
        [job] = await claim_one(store)
        assert await store.finish_many(
            [Outcome(id=job.id, token=job.lease_token, state=final)]) == {job.id}
        [second] = await store.enqueue_many([NewJob(kind="k", unique_key="u")])
        assert second.created and second.id != first.id
        # Back to one unfinished holder for the next round.
        assert await store.cancel(second.id) == ("available", "cancelled")


# --------------------------------------------------------------------------- delays, ordering


async def test_delayed_job_is_scheduled_and_not_claimable_before_its_time(store):
    [done] = await store.enqueue_many([NewJob(kind="k", delay_s=600)])
    row = await store.get_job(done.id)
    assert row["state"] == "scheduled"
    due = row["run_at"]
    assert due - row["created_at"] == secs(600)
    assert await claim_one(store, now=due - secs(1)) == []
    assert await store.next_due("default", ["k"]) > 500
    [job] = await claim_one(store, now=due)
    assert job.id == done.id
    assert (await store.get_job(done.id))["state"] == "running"


async def test_claim_orders_by_priority_then_run_at_then_id(store):
    done = await store.enqueue_many([
        NewJob(kind="k", priority=5),             # 0
        NewJob(kind="k", priority=0, delay_s=10),  # 1: same priority, later run_at
        NewJob(kind="k", priority=0),             # 2
        NewJob(kind="k", priority=0),             # 3: same run_at as 2, higher id
        NewJob(kind="k", priority=-1),            # 4
    ])
    later = await run_at(store, done[1].id) + secs(1)
    order = []
    while claimed := await claim_one(store, now=later):
        order.append(claimed[0].id)
    assert order == [done[i].id for i in (4, 2, 3, 1, 0)]


async def test_claim_sets_the_lease(store):
    [done] = await store.enqueue_many([NewJob(kind="k", max_attempts=2)])
    t0 = await run_at(store, done.id) + secs(5)
    [job] = await claim_one(store, owner="daemon-a", lease_s=30, now=t0)
    assert (job.attempt, job.lease_token, job.max_attempts) == (1, 1, 2)
    assert job.started_at == t0
    row = await store.get_job(done.id)
    assert (row["lease_owner"], row["lease_until"]) == ("daemon-a", t0 + secs(30))


async def test_claimed_fields_map_positionally_from_the_claim_row(store):
    """The store builds Claimed from the row by position: every field lands in its place."""
    [done] = await store.enqueue_many([NewJob(kind="k", args='{"a": 1}', key="acme", priority=3,
                                              max_attempts=4, tags=["t"], timeout_s=2.5,
                                              unique_key="u-1")])
    [job] = await claim_one(store)
    row = await store.get_job(done.id)
    assert (job.id, job.queue, job.kind, job.args, job.key, job.priority, job.attempt,
            job.max_attempts, job.lease_token, job.timeout_s, job.tags, job.errors,
            job.unique_key) == (done.id, "default", "k", '{"a": 1}', "acme", 3, 1, 4, 1, 2.5,
                                ["t"], "[]", "u-1")
    assert (job.run_at, job.created_at, job.started_at) == (row["run_at"], row["created_at"],
                                                            row["started_at"])


async def test_claim_respects_the_kinds_filter(store):
    done = await store.enqueue_many([NewJob(kind="a"), NewJob(kind="b"), NewJob(kind="c")])
    claimed = await claim_one(store, kinds=("b", "c"), limit=10)
    assert {j.kind for j in claimed} == {"b", "c"}
    assert await claim_one(store, kinds=("b", "c"), limit=10) == []
    assert await claim_one(store, kinds=(), limit=10) == []
    assert (await store.get_job(done[0].id))["state"] == "available"
    assert await store.next_due("default", ["a"]) is not None


async def test_claim_takes_disjoint_batches_and_skips_locked_rows(store):
    done = await store.enqueue_many([NewJob(kind="k") for _ in range(5)])
    ids = [d.id for d in done]
    async with store.transaction() as tx:
        # Another session holds the first job's row lock (e.g. a claim in flight).
        assert await tx.fetchval("SELECT id FROM jobd.jobs WHERE id = $1 FOR UPDATE",
                                 ids[0]) == ids[0]
        first = await claim_one(store, owner="a", limit=2)
        second = await claim_one(store, owner="b", limit=2)
        third = await claim_one(store, owner="c", limit=2)
    assert sorted(j.id for j in first) == ids[1:3]
    assert sorted(j.id for j in second) == ids[3:5]
    assert third == []
    [last] = await claim_one(store, owner="c", limit=2)
    assert last.id == ids[0]


async def test_other_queues_are_not_claimed(store):
    await store.enqueue_many([NewJob(kind="k", queue="other")])
    assert await claim_one(store) == []
    [job] = await store.claim("other", 1, "d", 30, ["k"])
    assert job.queue == "other"


# --------------------------------------------------------------------------- finish


async def test_finish_is_fenced_by_the_lease_token(store):
    [done] = await store.enqueue_many([NewJob(kind="k")])
    [job] = await claim_one(store)
    stale = Outcome(id=job.id, token=job.lease_token - 1, state="completed", result='"x"')
    assert await store.finish_many([stale]) == set()
    assert (await store.get_job(job.id))["state"] == "running"
    good = Outcome(id=job.id, token=job.lease_token, state="completed", result='{"ok": true}')
    assert await store.finish_many([good]) == {job.id}
    row = await store.get_job(job.id)
    assert (row["state"], row["progress"], row["lease_owner"]) == ("completed", 100, None)
    assert msgspec.json.decode(row["result"]) == {"ok": True}
    assert row["finished_at"] is not None
    # A second finish of the same attempt matches nothing.
    assert await store.finish_many([good]) == set()
    assert await store.finish_many([]) == set()


async def test_finish_many_mixes_outcomes(store):
    done = await store.enqueue_many([NewJob(kind="k") for _ in range(3)])
    jobs = {j.id: j for j in await claim_one(store, limit=3)}
    a, b, c = (jobs[d.id] for d in done)
    error = '{"attempt": 1, "class": "unknown", "message": "boom"}'
    finished = await store.finish_many([
        Outcome(id=a.id, token=a.lease_token, state="failed", error=error),
        Outcome(id=b.id, token=b.lease_token, state="scheduled", delay_s=3600, error=error),
        Outcome(id=c.id, token=c.lease_token, state="scheduled", delay_s=60, refund=1),
    ])
    assert finished == {a.id, b.id, c.id}
    ra, rb, rc = [await store.get_job(j.id) for j in (a, b, c)]
    assert (ra["state"], ra["attempt"], ra["finished_at"] is not None) == ("failed", 1, True)
    assert [e["class"] for e in msgspec.json.decode(ra["errors"])] == ["unknown"]
    assert (rb["state"], rb["attempt"], rb["finished_at"]) == ("scheduled", 1, None)
    assert rb["run_at"] > rc["run_at"] > rc["created_at"]
    assert (rc["state"], rc["attempt"], msgspec.json.decode(rc["errors"])) == ("scheduled", 0, [])


async def test_snoozes_do_not_grow_errors(store):
    """A job that snoozes (RetryAfter) every attempt for days keeps one entry for its run
    of snoozes, counted, not one per snooze; real errors are all kept."""
    [done] = await store.enqueue_many([NewJob(kind="k")])

    async def finish(cls: str, at: int) -> list[dict]:
        [job] = await claim_one(store, now=await run_at(store, done.id) + secs(1))
        error = msgspec.json.encode({"attempt": job.attempt, "at": f"t{at}", "class": cls,
                                     "message": cls}).decode()
        refund = 1 if cls == "snooze" else 0
        assert await store.finish_many([Outcome(id=job.id, token=job.lease_token,
                                                state="available", error=error,
                                                refund=refund)]) == {job.id}
        return msgspec.json.decode((await store.get_job(done.id))["errors"])

    for i in range(50):
        errors = await finish("snooze", i)
    assert len(errors) == 1
    assert errors[0]["snoozes"] == 50 and errors[0]["first_at"] == "t0"
    assert errors[0]["at"] == "t49" and errors[0]["class"] == "snooze"
    errors = await finish("network", 50)
    assert [e["class"] for e in errors] == ["snooze", "network"]
    for i in range(51, 54):
        errors = await finish("snooze", i)
    assert [e["class"] for e in errors] == ["snooze", "network", "snooze"]
    assert (errors[-1]["snoozes"], errors[-1]["first_at"], errors[-1]["at"]) == (3, "t51", "t53")
    assert (await store.get_job(done.id))["attempt"] == 1  # only the network error counted


# --------------------------------------------------------------------------- cancel, progress


async def test_cancel_a_queued_job(store):
    [done] = await store.enqueue_many([NewJob(kind="k", delay_s=3600)])
    assert await store.cancel(done.id) == ("scheduled", "cancelled")
    row = await store.get_job(done.id)
    assert row["state"] == "cancelled" and row["finished_at"] is not None
    assert await claim_one(store, now=row["run_at"]) == []
    assert await store.cancel(done.id) == ("cancelled", "cancelled")
    assert await store.cancel(10**9) is None


async def test_cancel_a_running_job_requests_it(store):
    [done] = await store.enqueue_many([NewJob(kind="k")])
    [job] = await claim_one(store, owner="daemon-a")
    assert await store.cancel(done.id) == ("running", "cancelling")
    row = await store.get_job(done.id)
    assert (row["state"], row["cancel_requested"]) == ("running", True)
    assert await store.running_cancel_requests("daemon-a") == [done.id]
    assert await store.running_cancel_requests("daemon-b") == []
    finished = await store.finish_many(
        [Outcome(id=job.id, token=job.lease_token, state="cancelled")])
    assert finished == {job.id}
    row = await store.get_job(done.id)
    assert (row["state"], row["cancel_requested"]) == ("cancelled", False)
    assert await store.running_cancel_requests("daemon-a") == []


async def test_write_progress(store):
    [done] = await store.enqueue_many([NewJob(kind="k")])
    [job] = await claim_one(store, lease_s=1)
    lease_before = (await store.get_job(job.id))["lease_until"]
    await store.write_progress([ProgressUpdate(job.id, job.lease_token, 42.5, "step 1")], 3600)
    row = await store.get_job(job.id)
    assert (row["progress"], row["progress_note"]) == (42.5, "step 1")
    assert row["lease_until"] >= lease_before + secs(3000)
    # None keeps the previous value; a stale token writes nothing.
    await store.write_progress([ProgressUpdate(job.id, job.lease_token, None, "step 2")], 3600)
    await store.write_progress([ProgressUpdate(job.id, job.lease_token - 1, 99.0, "stale")], 60)
    await store.write_progress([], 60)
    row = await store.get_job(job.id)
    assert (row["progress"], row["progress_note"]) == (42.5, "step 2")


# --------------------------------------------------------------------------- jobd.enqueue()


async def test_sql_enqueue_is_part_of_the_application_transaction(store, sql):
    sql.execute("BEGIN; SELECT jobd.enqueue('k', '{\"a\": 1}'); ROLLBACK;")
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 0
    sql.execute("BEGIN; SELECT jobd.enqueue('k', '{\"a\": 1}', unique_key => 'u'); COMMIT;")
    rows = sql.fetch("SELECT id, kind, args::text, state, unique_key FROM jobd.jobs")
    assert len(rows) == 1
    assert (rows[0]["kind"], rows[0]["state"], rows[0]["unique_key"]) == ("k", "available", "u")
    job_id = rows[0]["id"]
    assert sql.fetchval("SELECT jobd.enqueue('k', unique_key => 'u')") == job_id
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 1
    # The job the application enqueued is claimable like any other.
    [job] = await claim_one(store)
    assert job.id == job_id and msgspec.json.decode(job.args) == {"a": 1}


async def test_sql_enqueue_options(store, sql):
    job_id = sql.fetchval(
        "SELECT jobd.enqueue('k', queue => 'q', key => 'acme', priority => 3::smallint,"
        " run_at => now() + interval '1 hour', max_attempts => 9, tags => '{t}',"
        " timeout_s => 2.5)")
    row = await store.get_job(job_id)
    assert (row["queue"], row["key"], row["priority"], row["state"]) == ("q", "acme", 3,
                                                                        "scheduled")
    assert (row["max_attempts"], list(row["tags"]), row["timeout_s"]) == (9, ["t"], 2.5)
    # A unique key that only a finished job holds is free.
    sql.execute("UPDATE jobd.jobs SET unique_key = 'done', state = 'completed' WHERE id = $1",
                job_id)
    fresh = sql.fetchval("SELECT jobd.enqueue('k', unique_key => 'done')")
    assert fresh != job_id


@pytest.mark.parametrize("analyzed", [True, False], ids=["analyzed-while-idle", "never-analyzed"])
async def test_statements_given_job_ids_stay_linear_whatever_the_statistics_say(store, sql,
                                                                               analyzed):
    """A backlog analyzed while idle makes 'running' look empty, and a table never
    analyzed looks tiny: either way the generic plans of statements given job ids (the
    finish, progress, step writes, lease tests) must find jobs by id, not test every
    running row against every input row (that finish plan took seconds per batch and
    dropped a daemon to 600 jobs/s)."""
    from daemon.store.jobs import outcome_columns
    from daemon.store.sql import callbacks as cq
    from daemon.store.sql import jobs as q
    from daemon.store.sql import workflows as wq

    sql.execute("INSERT INTO jobd.jobs (kind) SELECT 'k' FROM generate_series(1, 30000)")
    if analyzed:
        sql.execute("ANALYZE jobd.jobs")
    claimed = await store.claim("default", 300, "d1", 30.0, ["k"])
    outcomes = [Outcome(id=j.id, token=j.lease_token, state="completed", result="null",
                        flow="ok") for j in claimed]
    for query, types, args in (
        (q.FINISH_MANY, "bigint[], int[], text[], text[], float8[], text[], int[], text[], float8[],"
                        " text[], text[]",
         outcome_columns(outcomes)),
        (q.WRITE_PROGRESS, "bigint[], int[], real[], text[], float8",
         ([j.id for j in claimed], [j.lease_token for j in claimed], [50.0] * len(claimed),
          [None] * len(claimed), 30.0)),
        # The step writer's statement (16 ms for 200 steps on the running-jobs index,
        # 1.6 ms by primary key), and the single-job lease tests of workflows and
        # HTTP-handler callbacks, which read every running job on that index.
        (wq.SAVE_STEPS, "bigint[], bigint[], text[], text[], int[], float8[]",
         ([j.id for j in claimed], [j.lease_token for j in claimed], ["s"] * len(claimed),
          ["1"] * len(claimed), [1] * len(claimed), [0.0] * len(claimed))),
        (wq.GATHER_CHILDREN, "bigint, bigint, jsonb, bigint[]",
         (claimed[0].id, claimed[0].lease_token, "{}", [claimed[1].id])),
        (wq.BEGIN_WAIT, "bigint, bigint, text, text, jsonb, float8",
         (claimed[0].id, claimed[0].lease_token, "wait:x", "x", "{}", 30.0)),
        (cq.CALLBACK_RENEW, "bigint, bigint, real, text, float8",
         (claimed[0].id, claimed[0].lease_token, 50.0, "n", 30.0)),
    ):
        plan = "\n".join(await store._run(generic_plan, query, types, *args))
        # Quadratic: every (job, input row) pair tested in a join filter. Linear plans
        # probe the key (Index Cond) or hash it (Hash Cond).
        assert "Join Filter: ((j.id = x.id)" not in plan, plan
        assert "jobs_leases" not in plan, plan
    assert len(await store.finish_many(outcomes)) == 300



# --------------------------------------------------------------------------- stats


async def test_stats_and_key_stats_count_every_state_once(store, sql):
    """Unfinished stats and key stats count one arm per partial index (sql/jobs.py
    STATS_UNFINISHED, sql/flow.py KEY_STATS): every state is in exactly one arm, so the
    totals equal a plain GROUP BY."""
    states = ["scheduled", "available", "running", "waiting", "completed", "failed",
              "cancelled", "skipped"]
    sql.execute(
        "INSERT INTO jobd.jobs (kind, queue, key, state, run_at, finished_at) "
        "SELECT 'k', CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, "
        "       CASE WHEN g % 3 = 0 THEN NULL ELSE 'key' || (g % 4) END, "
        "       s.state, CASE WHEN s.state = 'scheduled' THEN now() + interval '1 h' "
        "                     ELSE now() END, "
        "       CASE WHEN s.state IN ('completed', 'failed', 'cancelled', 'skipped') "
        "            THEN now() END "
        "FROM unnest($1::text[]) WITH ORDINALITY AS s(state, i), generate_series(1, s.i::int * 3) g",
        states)
    expected = sql.fetch("SELECT queue, state, count(*) AS n FROM jobd.jobs "
                         "GROUP BY queue, state ORDER BY queue, state")
    assert await store.stats() == [(r["queue"], r["state"], r["n"]) for r in expected]
    assert await store.stats(finished=False) == [
        (r["queue"], r["state"], r["n"]) for r in expected
        if r["state"] in ("scheduled", "available", "running", "waiting")]
    keyed = sql.fetch(
        "SELECT queue, key, count(*) FILTER (WHERE state = 'running') AS running, "
        "       count(*) FILTER (WHERE state IN ('available', 'scheduled')) AS queued "
        "FROM jobd.jobs WHERE key IS NOT NULL AND state IN ('available', 'scheduled', 'running') "
        "GROUP BY queue, key")
    got = {(r["queue"], r["key"]): (r["running"], r["queued"])
           for r in await store.key_stats(None)}
    assert got == {(r["queue"], r["key"]): (r["running"], r["queued"]) for r in keyed}
    only_a = {(r["queue"], r["key"]) for r in await store.key_stats("a")}
    assert only_a == {(q, k) for q, k in got if q == "a"}
