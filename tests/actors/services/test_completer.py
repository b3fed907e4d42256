"""The completer's write path against a real Postgres: a value it refuses fails one
attempt (`invalid_value`), and the rest of the batch is written."""

from __future__ import annotations

import json

import trio

from actors.ports import NewJob, Outcome
from actors.runtime.clock import TrioClock
from actors.runtime.mailbox import Mailbox
from actors.services.batcher import Batcher
from actors.services.outcomes import refused_outcome


async def test_a_batch_with_values_postgres_refuses_is_split_and_the_rest_written(store):
    await store.enqueue_many([NewJob(kind="k") for _ in range(6)])
    jobs = await store.claim("default", 10, "d1", 30.0, ["k"])
    a, b, c, d, e, f = sorted(jobs, key=lambda j: j.id)
    outcomes = [
        Outcome(id=a.id, token=a.lease_token, state="completed", result='{"ok": 1}'),
        # jsonb refuses \u0000: a DataError from the server.
        Outcome(id=b.id, token=b.lease_token, state="completed",
                result='{"html": "a\\u0000b"}'),
        Outcome(id=c.id, token=c.lease_token, state="completed", result='{"ok": 3}'),
        # A lone surrogate cannot even be encoded to UTF-8 on our side; a retry keeps
        # its retry.
        Outcome(id=d.id, token=d.lease_token, state="available", delay_s=0.0,
                error=json.dumps({"class": "unknown", "message": "\ud800"},
                                 ensure_ascii=False)),
        # A NUL in a text column (the error JSON is cast from text).
        Outcome(id=e.id, token=e.lease_token, state="failed",
                error='{"class": "unknown", "message": "x\x00y"}'),
        Outcome(id=f.id, token=f.lease_token, state="completed", result='{"ok": 6}'),
    ]
    box: Mailbox[Outcome] = Mailbox("completer", capacity=10)
    for outcome in outcomes:
        await box.tell(outcome)
    box.close()
    settled: list[Outcome] = []
    with trio.fail_after(20):
        await Batcher(box, lambda batch: store.finish_many(batch), clock=TrioClock(),
                      reject=refused_outcome, settled=settled.extend).run()
    assert sorted(o.id for o in settled) == sorted(o.id for o in outcomes)

    rows = {j.id: await store.get_job(j.id) for j in jobs}
    assert [rows[j.id]["state"] for j in (a, b, c, d, e, f)] == [
        "completed", "failed", "completed", "available", "failed", "completed"]
    for job in (b, d, e):
        [error] = json.loads(rows[job.id]["errors"])
        assert error["class"] == "invalid_value", error
        assert "refused" in error["message"]
    assert json.loads(rows[c.id]["result"]) == {"ok": 3}
