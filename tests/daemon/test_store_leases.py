"""Lease fencing at the store: once a lease is rescued, the old attempt's token is dead.

Deterministic: time is pinned through the statements' `now` parameter.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from actors.ports import NewJob, Outcome, ProgressUpdate
from daemon.store import LeaseLost


async def test_rescued_attempt_cannot_finish_or_touch_the_job(store):
    [enq] = await store.enqueue_many([NewJob(kind="k", queue="q", max_attempts=5)])
    job_id = enq.id
    [first] = await store.claim("q", 10, "d1", 30.0, ["k"])
    assert (first.id, first.attempt) == (job_id, 1)
    assert await store.rescue_expired(100) == []  # a live lease is left alone

    later = datetime.now(UTC) + timedelta(hours=1)  # d1's lease has long expired by then
    swept = await store.rescue_expired(100, now=later)
    assert [(s.id, s.state) for s in swept] == [(job_id, "available")]
    [second] = await store.claim("q", 10, "d2", 30.0, ["k"], now=later)
    assert (second.id, second.attempt) == (job_id, 2)
    assert second.lease_token == first.lease_token + 2  # bumped by the rescue and the claim
    before = await store.get_job(job_id)
    assert (before["state"], before["lease_owner"]) == ("running", "d2")

    # The zombie (attempt 1) tries everything an attempt can do to its row.
    assert await store.heartbeat("d1", 30.0, "ready", False, now=later) == []
    zombie = (job_id, first.lease_token)
    assert await store.heartbeat("d1", 30.0, "ready", False, now=later,
                                 running=[zombie]) == [zombie]  # it lost the lease
    await store.write_progress([ProgressUpdate(job_id, first.lease_token, 99.0, "zombie")], 30.0)
    for state in ("completed", "failed", "available"):
        outcome = Outcome(id=job_id, token=first.lease_token, state=state,
                          result=json.dumps({"by": 1}), error=json.dumps({"class": "zombie"}))
        assert await store.finish_many([outcome]) == set()
    with pytest.raises(LeaseLost):
        async with store.transaction() as tx:
            await tx.finish(Outcome(id=job_id, token=first.lease_token, state="completed",
                                    result=json.dumps({"by": 1})))
    assert await store.get_job(job_id) == before, "a fenced write changed the job"

    # The live attempt finishes normally; afterwards even its own token is spent.
    done = Outcome(id=job_id, token=second.lease_token, state="completed",
                   result=json.dumps({"by": 2}))
    assert await store.finish_many([done]) == {job_id}
    assert await store.finish_many([done]) == set()
    assert await store.finish_many(
        [Outcome(id=job_id, token=first.lease_token, state="failed")]) == set()
    row = await store.get_job(job_id)
    assert (row["state"], row["attempt"], row["lease_owner"]) == ("completed", 2, None)
    assert json.loads(row["result"]) == {"by": 2}
    errors = json.loads(row["errors"])
    assert [(e["class"], e["attempt"]) for e in errors] == [("rescued", 1)]
    assert "d1" in errors[0]["message"]
