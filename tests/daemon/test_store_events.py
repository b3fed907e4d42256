"""jobd.send_event and the subscriptions it reads (migration 0019), against a real Postgres:
what one event starts, cancels and wakes, idempotency, the refusals by SQLSTATE, and how
daemons' subscription syncs combine."""

from __future__ import annotations

import asyncpg
import msgspec
import pytest

from actors.ports import EventToSend, Subscription
from tests.support import Sql, run_async

CAPTURE = Subscription(event="marketplace/capture", kind="listings.capture", action="start",
                       queue="crawl", priority=5, max_attempts=4, timeout_s=60.0,
                       key_path=["marketplace"])
UK_ONLY = Subscription(event="marketplace/capture", kind="listings.uk", action="start",
                       match={"region": "uk"})
CANCEL = Subscription(event="order/cancelled", kind="orders.predict", action="cancel",
                      fields=["order_id"])


def send(name: str, data: dict, key: str | None = None) -> EventToSend:
    return EventToSend(name, msgspec.json.encode(data).decode(), key)


async def register(store, daemon_id: str) -> None:
    await store.register_daemon(daemon_id, "test", "host", 1, "0")


async def test_an_event_starts_one_job_per_matching_subscription_with_its_defaults(store, sql):
    await register(store, "d1")
    assert await store.sync_subscriptions("d1", [CAPTURE, UK_ONLY], ["listings.capture",
                                                                      "listings.uk"], 60) == (2, 0)
    [fr] = await store.send_events([send("marketplace/capture",
                                         {"marketplace": "ebay", "region": "fr"})])
    assert fr.created and len(fr.started) == 1 and fr.started_kinds == ["listings.capture"]
    [uk] = await store.send_events([send("marketplace/capture",
                                         {"marketplace": "amazon", "region": "uk"})])
    assert sorted(uk.started_kinds) == ["listings.capture", "listings.uk"]
    row = sql.fetch("SELECT kind, queue, key, priority, max_attempts, timeout_s, args::text, "
                    "event_id, state FROM jobd.jobs WHERE id = $1", fr.started[0])[0]
    assert dict(row) == {"kind": "listings.capture", "queue": "crawl", "key": "ebay",
                         "priority": 5, "max_attempts": 4, "timeout_s": 60.0,
                         "args": '{"region": "fr", "marketplace": "ebay"}',
                         "event_id": fr.id, "state": "available"}
    assert sql.fetchval("SELECT jobs FROM jobd.events WHERE id = $1", uk.id) == uk.started
    # No subscription: stored, starts nothing.
    [other] = await store.send_events([send("nobody.listens", {})])
    assert other.created and other.started == []


async def test_an_idempotency_key_counts_once_within_the_window_then_again(store, sql):
    await register(store, "d1")
    await store.sync_subscriptions("d1", [CAPTURE], ["listings.capture"], 60)
    first, again, other = await store.send_events([
        send("marketplace/capture", {"marketplace": "ebay"}, "k1"),
        send("marketplace/capture", {"marketplace": "ebay"}, "k1"),  # same batch
        send("marketplace/capture", {"marketplace": "ebay"}, "k2"),
    ])
    assert first.created and not again.created and again.id == first.id and again.started == []
    assert other.created and other.id != first.id
    [later] = await store.send_events([send("marketplace/capture", {"marketplace": "x"}, "k1")])
    assert not later.created and later.id == first.id
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 2
    # Past the window the key is accepted again (and the expired key row is reused).
    sql.execute("UPDATE jobd.event_keys SET expires_at = now() - interval '1 s' WHERE key = 'k1'")
    [renewed] = await store.send_events([send("marketplace/capture", {"marketplace": "y"}, "k1")])
    assert renewed.created and renewed.id != first.id and len(renewed.started) == 1
    # Pruning removes only expired keys.
    sql.execute("UPDATE jobd.event_keys SET expires_at = now() - interval '1 s' WHERE key = 'k2'")
    assert await store.prune_event_keys(100) == 1
    assert [r["key"] for r in sql.fetch("SELECT key FROM jobd.event_keys")] == ["k1"]


async def test_cancel_on_cancels_queued_and_waiting_and_marks_running_jobs(store, sql):
    await register(store, "d1")
    await store.sync_subscriptions("d1", [CANCEL], ["orders.predict"], 60)
    ids = [sql.fetchval("SELECT jobd.enqueue('orders.predict', $1::jsonb)",
                        msgspec.json.encode(args).decode())
           for args in ({"order_id": 7}, {"order_id": 7, "user": "a"}, {"order_id": 8}, {})]
    sql.execute("UPDATE jobd.jobs SET state = 'running', lease_owner = 'd1' WHERE id = $1", ids[1])
    [sent] = await store.send_events([send("order/cancelled", {"order_id": 7})])
    assert sorted(sent.cancelled) == ids[:2]
    states = {r["id"]: (r["state"], r["cancel_requested"])
              for r in sql.fetch("SELECT id, state, cancel_requested FROM jobd.jobs")}
    assert states == {ids[0]: ("cancelled", False), ids[1]: ("running", True),
                      ids[2]: ("available", False), ids[3]: ("available", False)}
    # Data without the field cancels nothing (never "every job whose field is missing").
    [none] = await store.send_events([send("order/cancelled", {"other": 1})])
    assert none.cancelled == []


async def test_send_from_sql_inside_a_transaction_exists_only_if_it_commits(store, sql, fresh_database):
    await register(store, "d1")
    await store.sync_subscriptions("d1", [CAPTURE], ["listings.capture"], 60)
    send_sql = ("SELECT * FROM jobd.send_event('marketplace/capture', "
                "'{\"marketplace\": \"ebay\"}', id => 'tx1')")

    async def rolled_back() -> bool:
        connection = await asyncpg.connect(fresh_database)
        try:
            tx = connection.transaction()
            await tx.start()
            row = await connection.fetchrow(send_sql)
            await tx.rollback()
            return row["created"] and len(row["started"]) == 1
        finally:
            await connection.close()

    assert run_async(rolled_back)
    for table in ("events", "jobs", "event_keys"):
        assert sql.fetchval(f"SELECT count(*) FROM jobd.{table}") == 0
    event_id = sql.fetchval(send_sql.replace("*", "event_id"))
    assert sql.fetchval("SELECT event_id FROM jobd.jobs") == event_id


@pytest.mark.parametrize(("call", "sqlstate", "says"), [
    ("jobd.send_event('', '{}')", "22023", "name must be 1 to 200"),
    ("jobd.send_event('has space', '{}')", "22023", "name must be"),
    ("jobd.send_event(repeat('a', 201), '{}')", "22023", "name must be"),
    ("jobd.send_event(NULL, '{}')", "22023", "name must be"),
    ("jobd.send_event('e', '[1]')", "22023", "data must be a JSON object, got array"),
    ("jobd.send_event('e', NULL)", "22023", "data must be a JSON object, got NULL"),
    ("jobd.send_event('e', '{}', id => '')", "22023", "id must be 1 to 256"),
    ("jobd.send_event('e', '{}', id => repeat('x', 257))", "22023", "id must be 1 to 256"),
    ("jobd.send_event('e', jsonb_build_object('x', repeat('y', 2000000)))", "54000",
     "over the limit of 1048576 bytes"),
])
async def test_sql_send_refuses_bad_values_with_a_sqlstate_naming_the_parameter(store, sql, call, sqlstate,
                                                                              says):
    with pytest.raises(asyncpg.PostgresError) as caught:
        sql.fetchval(f"SELECT event_id FROM {call}")
    assert caught.value.sqlstate == sqlstate
    assert says in str(caught.value) and str(caught.value).startswith("jobd.send_event:")


async def test_sql_send_cannot_carry_a_nul(store, sql: Sql):
    with pytest.raises(asyncpg.PostgresError):
        sql.fetchval("SELECT event_id FROM jobd.send_event('e', '{\"x\": \"\\u0000\"}')")


async def test_a_sync_removes_only_what_no_live_daemon_declares(store, sql):
    await register(store, "d1")
    await register(store, "d2")
    both = ["listings.capture", "listings.uk"]
    await store.sync_subscriptions("d1", [CAPTURE, UK_ONLY], both, 60)
    await store.sync_subscriptions("d2", [CAPTURE, UK_ONLY], both, 60)
    # d1 drops listings.uk's subscription; d2 (live) still declares it: it stays.
    assert await store.sync_subscriptions("d1", [CAPTURE], both, 60) == (1, 0)
    assert len(await store.list_subscriptions()) == 2
    # d2 drops it too: now nobody live declares it, and d2 runs the kind: it goes.
    assert await store.sync_subscriptions("d2", [CAPTURE], both, 60) == (1, 1)
    assert [s["kind"] for s in await store.list_subscriptions()] == ["listings.capture"]
    # A daemon that neither runs orders.predict nor declared it leaves its row alone
    # (its daemon may be down for a deploy; events then still cancel its jobs).
    await register(store, "d3")
    await store.sync_subscriptions("d3", [CANCEL], ["orders.predict"], 60)
    sql.execute("UPDATE jobd.daemons SET heartbeat_at = now() - interval '1 hour' WHERE id = 'd3'")
    await store.sync_subscriptions("d1", [CAPTURE], both, 60)
    assert {s["action"] for s in await store.list_subscriptions()} == {"start", "cancel"}
    # The last daemon to declare a subscription sets its options.
    await store.sync_subscriptions("d2", [msgspec.structs.replace(CAPTURE, queue="fast")], both, 60)
    [capture] = [s for s in await store.list_subscriptions() if s["kind"] == "listings.capture"]
    assert capture["queue"] == "fast" and capture["daemon_id"] == "d2"


async def test_an_event_still_wakes_its_waiting_workflows(store, sql):
    job = sql.fetchval("SELECT jobd.enqueue('wf', '{}')")
    sql.execute("""UPDATE jobd.jobs SET state = 'waiting', waiting_on = jsonb_build_object(
                       'type', 'event', 'name', 'paid', 'match', '{"order": 1}'::jsonb,
                       'since', 0) WHERE id = $1""", job)
    [sent] = await store.send_events([send("paid", {"order": 1, "by": "ann"})])
    assert sent.woken == [job]
    assert sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", job) == "available"


async def test_batches_sharing_keys_in_opposite_orders_do_not_deadlock(store, sql):
    """Without the sorted key locks of jobd.send_events these two batches lock each
    other's key rows in opposite orders; Postgres would abort one (a deadlock)."""
    import trio

    keys = [f"k{i:03}" for i in range(300)]
    answers: list[list] = []

    async def batch(order: list[str]) -> None:
        answers.append(await store.send_events([send("e", {"k": k}, k) for k in order]))

    for round_ in range(3):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batch, [f"{k}:{round_}" for k in keys])
            nursery.start_soon(batch, [f"{k}:{round_}" for k in reversed(keys)])
    created = sum(a.created for sent in answers for a in sent)
    assert created == 3 * len(keys)
    assert sql.fetchval("SELECT count(*) FROM jobd.events") == 3 * len(keys)
    # Answered in the caller's order, a repeat inside a batch as a repeat.
    first, again = await store.send_events([send("e", {}, "x"), send("e", {}, "x")])
    assert first.created and not again.created and again.id == first.id
