"""The webhook outbox at the store: every way a job finishes writes its rows in the same
transaction, the trigger is on only while a subscription exists, claims fence and
skip each other, replay and pruning. Time is pinned through the statements' `now`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from actors.ports import DeliveryOutcome, NewJob, Outcome

ALL = ["completed", "failed", "cancelled"]


def hook(name: str, events: list[str] = ALL, kinds: list[str] = (),  # type: ignore[assignment]
         queues: list[str] = ()) -> dict:  # type: ignore[assignment]
    return {"name": name, "events": events, "kinds": list(kinds), "queues": list(queues)}


async def trigger_on(store) -> bool:
    return await store._fetchval(
        "SELECT tgenabled <> 'D' FROM pg_trigger WHERE tgname = 'jobs_webhooks'")


async def outbox(store) -> list[dict]:
    return [dict(r) for r in await store._fetch(
        "SELECT id, webhook, event, job_id, state, payload::text AS payload"
        " FROM jobd.webhook_outbox ORDER BY id")]


async def run_one(store, kind: str = "k", queue: str = "q", state: str = "completed",
                  max_attempts: int = 3) -> int:
    [enq] = await store.enqueue_many([NewJob(kind=kind, queue=queue, max_attempts=max_attempts,
                                             tags=["t1"])])
    [claimed] = await store.claim(queue, 1, "d1", 30.0, [kind])
    await store.finish_many([Outcome(id=enq.id, token=claimed.lease_token, state=state,
                                     result=json.dumps({"n": 1}) if state == "completed" else None,
                                     error=None if state == "completed" else
                                     json.dumps({"class": "fail", "message": "boom"}))])
    return enq.id


async def test_trigger_follows_the_subscriptions_and_rows_carry_the_payload(store):
    await store.register_daemon("d1", "r", "h", 1, "v")
    assert not await trigger_on(store)
    await run_one(store)  # no subscription: no row, and the trigger is off
    assert await outbox(store) == []

    await store.sync_webhooks("d1", [hook("all"), hook("crawl", kinds=["k"], queues=["crawl"]),
                                     hook("fails", events=["failed"])])
    assert await trigger_on(store)
    done = await run_one(store)
    failed = await run_one(store, state="failed")
    crawled = await run_one(store, queue="crawl")
    rows = await outbox(store)
    assert [(r["webhook"], r["event"], r["job_id"]) for r in rows] == [
        ("all", "completed", done), ("all", "failed", failed), ("fails", "failed", failed),
        ("all", "completed", crawled), ("crawl", "completed", crawled)]
    payload = json.loads(rows[0]["payload"])
    assert payload["type"] == "job.completed"
    assert payload["data"]["id"] == done and payload["data"]["result"] == {"n": 1}
    assert payload["data"]["tags"] == ["t1"] and payload["data"]["error"] is None
    failure = json.loads(rows[1]["payload"])["data"]
    assert failure["error"]["message"] == "boom" and failure["result"] is None

    await store.sync_webhooks("d1", [])
    assert not await trigger_on(store)
    assert await store._fetchval("SELECT count(*) FROM jobd.webhooks") == 0


async def test_every_finish_path_writes_rows(store):
    await store.register_daemon("d1", "r", "h", 1, "v")
    await store.sync_webhooks("d1", [hook("all")])
    [queued] = await store.enqueue_many([NewJob(kind="k", queue="q")])
    assert (await store.cancel(queued.id))[1] == "cancelled"
    [enq] = await store.enqueue_many([NewJob(kind="k", queue="q", max_attempts=1)])
    await store.claim("q", 1, "d1", 1.0, ["k"])
    later = datetime.now(UTC) + timedelta(hours=1)
    assert [s.state for s in await store.rescue_expired(10, now=later)] == ["failed"]
    [tx_job] = await store.enqueue_many([NewJob(kind="k", queue="q")])
    [claimed] = await store.claim("q", 1, "d1", 30.0, ["k"])
    async with store.transaction() as tx:
        await tx.finish(Outcome(id=tx_job.id, token=claimed.lease_token, state="completed",
                                result="{}"))
    rows = await outbox(store)
    assert [(r["event"], r["job_id"]) for r in rows] == [
        ("cancelled", queued.id), ("failed", enq.id), ("completed", tx_job.id)]


async def test_claims_fence_skip_and_record(store):
    await store.register_daemon("d1", "r", "h", 1, "v")
    await store.sync_webhooks("d1", [hook("w")])
    for _ in range(3):
        await run_one(store)
    now = datetime.now(UTC) + timedelta(seconds=1)
    first = await store.claim_deliveries("d1", {"w": 2}, 10.0, now=now)
    assert len(first) == 2 and all(d.attempts == 1 for d in first)
    # The claimed rows are leased: another daemon gets only the third.
    second = await store.claim_deliveries("d2", {"w": 5}, 10.0, now=now)
    assert [d.id for d in second] == [max(d.id for d in [*first, *second])]
    assert await store.claim_deliveries("d2", {"w": 5}, 10.0, now=now) == []
    assert 9 < await store.next_delivery_due(["w"], now=now) <= 10
    assert await store.next_delivery_due(["other"], now=now) is None  # none pending: no wake-up

    a, b = first
    c = second[0]
    await store.record_deliveries([
        DeliveryOutcome(id=b.id, attempts=1, state="delivered", status=200),
        DeliveryOutcome(id=c.id, attempts=1, state="failed", status=400, error="bad")])
    # d1's lease on `a` runs out, d2 claims it again (attempt 2); d1's late retry is fenced.
    expired = now + timedelta(seconds=11)
    [again] = await store.claim_deliveries("d2", {"w": 5}, 10.0, now=expired)
    assert (again.id, again.attempts) == (a.id, 2)
    await store.record_deliveries([
        DeliveryOutcome(id=a.id, attempts=1, state="pending", delay_s=1, status=500, error="x")])
    rows = {r["id"]: r for r in await store.list_deliveries(None, None, None, 10)}
    assert {i: r["state"] for i, r in rows.items()} == {
        a.id: "pending", b.id: "delivered", c.id: "failed"}
    assert (rows[a.id]["attempts"], rows[a.id]["last_status"]) == (2, None)
    assert [r["id"] for r in await store.list_deliveries("failed", "w", None, 10)] == [c.id]

    assert await store.replay_deliveries([], True) == [(c.id, "w")]
    [replayed] = await store.claim_deliveries("d1", {"w": 5}, 10.0, now=expired)
    assert (replayed.id, replayed.attempts) == (c.id, 1)
    backlog = await store.delivery_backlog(["w"], now=expired)
    assert backlog["w"][0] == 2 and backlog["w"][1] >= 0


async def test_prune_and_orphans(store):
    await store.register_daemon("d1", "r", "h", 1, "v")
    await store.register_daemon("d2", "r", "h", 2, "v")
    await store.sync_webhooks("d1", [hook("mine")])
    await store.sync_webhooks("d2", [hook("theirs")])
    await run_one(store)
    delivered = await store.claim_deliveries("d1", {"mine": 5, "theirs": 5}, 10.0)
    await store.record_deliveries([DeliveryOutcome(id=d.id, attempts=1, state="delivered")
                                   for d in delivered if d.webhook == "mine"])
    later = datetime.now(UTC) + timedelta(days=2)
    assert await store.prune_deliveries({"mine": (86400.0, 86400.0)}, 100, 7 * 86400.0,
                                        now=later) == 1
    # d2 drops its webhook: nobody declares it, its pending row fails, the trigger stays on.
    await store.sync_webhooks("d2", [])
    rows = await outbox(store)
    assert [(r["webhook"], r["state"]) for r in rows] == [("theirs", "failed")]
    assert await store.replay_deliveries([rows[0]["id"]], False) == []  # nobody could send it
    assert await trigger_on(store)


async def test_a_restarting_daemon_keeps_its_webhooks_for_a_while(store):
    await store.register_daemon("d1", "r", "h", 1, "v")
    await store.register_daemon("d2", "r", "h", 2, "v")
    await store.sync_webhooks("d1", [hook("mine")])
    await store.deregister_daemon("d1")  # a clean stop: a restart is on its way
    await store.sync_webhooks("d2", [])  # another daemon's periodic sync meanwhile
    await run_one(store)
    assert [r["webhook"] for r in await outbox(store)] == ["mine"], "a finish was missed"
    # Nobody wrote it for ten minutes: it goes, its pending row fails.
    await store._execute("UPDATE jobd.webhooks SET declared_at = now() - interval '11 minutes'")
    await store.sync_webhooks("d2", [])
    assert [r["state"] for r in await outbox(store)] == ["failed"]
    assert not await trigger_on(store)
