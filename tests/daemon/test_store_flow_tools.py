"""Flow-control tools in Postgres (migration 0020: jobd.enqueue_tools, the batch seal, the
singleton wake-up) against a real, migrated database.

Timing runs on a pinned clock: enqueue_tools takes `now` (p_now) and claims take `now`,
both moved forward by the test, so nothing depends on how fast a query runs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest

from actors.ports import NewJob, Outcome
from actors.tools import Tools

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


async def declare(store, **tools: dict) -> None:
    await store.sync_kind_tools({kind: Tools(**t) for kind, t in tools.items()})


def enqueue(sql, kind: str, args: dict, when: float, *, keys: dict | None = None,
            unique_key: str | None = None, delay_s: float | None = None) -> tuple[int, bool, str]:
    row = NewJob(kind=kind, args=msgspec.json.encode(args).decode(), unique_key=unique_key,
                 delay_s=delay_s, tool_keys=keys or {})
    [r] = sql.fetch("SELECT id, created, outcome FROM jobd.enqueue_tools($1::json, NULL, $2)",
                    msgspec.json.encode([row]).decode(), at(when))
    return r["id"], r["created"], r["outcome"]


async def claim(store, kind: str, when: float, limit: int = 10):
    return await store.claim("default", limit, "d1", 30.0, [kind], now=at(when))


def job(sql, job_id: int):
    return sql.fetch("SELECT * FROM jobd.jobs WHERE id = $1", job_id)[0]


# --------------------------------------------------------------------------- debounce


async def test_debounce_burst_runs_once_with_the_last_args_after_the_last(store, sql):
    await declare(store, d={"debounce_s": 5.0, "debounce_field": "m"})
    first = enqueue(sql, "d", {"m": "ebay", "n": 1}, 0)
    assert first[1:] == (True, "created")
    assert enqueue(sql, "d", {"m": "ebay", "n": 2}, 2) == (first[0], False, "debounced")
    assert enqueue(sql, "d", {"m": "ebay", "n": 3}, 4) == (first[0], False, "debounced")
    other = enqueue(sql, "d", {"m": "etsy", "n": 9}, 4)
    assert other[0] != first[0]
    row = job(sql, first[0])
    assert (row["state"], row["run_at"]) == ("scheduled", at(9))
    assert await claim(store, "d", 8.9) == []
    [c, c2] = await claim(store, "d", 9.1)
    assert {c.id, c2.id} == {first[0], other[0]}
    mine = c if c.id == first[0] else c2
    assert msgspec.json.decode(mine.args) == {"m": "ebay", "n": 3}
    # Once it started, the next arrival is a new pending run.
    again = enqueue(sql, "d", {"m": "ebay", "n": 4}, 10)
    assert again[1:] == (True, "created") and again[0] != first[0]


async def test_debounce_max_bounds_the_wait_of_a_steady_stream(store, sql):
    await declare(store, d={"debounce_s": 5.0, "debounce_max_s": 10.0})
    job_id = enqueue(sql, "d", {"n": 0}, 0)[0]
    for t in (4, 8, 12):
        assert enqueue(sql, "d", {"n": t}, t)[0] == job_id
        expected = min(t + 5, 10)
        assert job(sql, job_id)["run_at"] == at(expected)
    assert job(sql, job_id)["state"] == "available"  # the cap has passed: due now
    [c] = await claim(store, "d", 12)
    assert msgspec.json.decode(c.args) == {"n": 12}


async def test_debounce_key_from_a_function_travels_with_the_row(store, sql):
    await declare(store, d={"debounce_s": 5.0})
    a = enqueue(sql, "d", {"n": 1}, 0, keys={"debounce": "A"})[0]
    b = enqueue(sql, "d", {"n": 2}, 0, keys={"debounce": "B"})[0]
    assert a != b
    assert enqueue(sql, "d", {"n": 3}, 1, keys={"debounce": "A"})[0] == a


# --------------------------------------------------------------------------- batching


async def test_batch_fills_then_runs_with_every_item_once_in_order(store, sql):
    await declare(store, b={"batch_size": 3, "batch_timeout_s": 5.0, "batch_field": "day"})
    ids = [enqueue(sql, "b", {"day": "mon", "i": i}, i * 0.1) for i in range(7)]
    assert [o for _, _, o in ids] == ["batched"] * 7
    assert [c for _, c, _ in ids] == [True, False, False, True, False, False, True]
    full1, full2, open_ = ids[0][0], ids[3][0], ids[6][0]
    assert (job(sql, full1)["state"], job(sql, full2)["state"]) == ("available", "available")
    assert job(sql, open_)["run_at"] == at(0.6 + 5)
    claimed = await claim(store, "b", 1)
    assert sorted(c.id for c in claimed) == [full1, full2]
    for c in claimed:
        items = msgspec.json.decode(c.args)["items"]
        base = 0 if c.id == full1 else 3
        assert items == [{"day": "mon", "i": base + k} for k in range(3)]
    assert sql.fetchval("SELECT count(*) FROM jobd.batch_items") == 1
    # The partial batch runs at its timeout.
    assert await claim(store, "b", 5.5) == []
    [last] = await claim(store, "b", 5.7)
    assert msgspec.json.decode(last.args) == {"items": [{"day": "mon", "i": 6}]}
    assert sql.fetchval("SELECT count(*) FROM jobd.batch_items") == 0


async def test_batches_are_per_key_and_a_retry_keeps_its_items(store, sql):
    await declare(store, b={"batch_size": 10, "batch_timeout_s": 1.0, "batch_field": "day"})
    mon = enqueue(sql, "b", {"day": "mon"}, 0)[0]
    tue = enqueue(sql, "b", {"day": "tue"}, 0)[0]
    assert mon != tue
    [c1, c2] = await claim(store, "b", 2)
    c = c1 if c1.id == mon else c2
    await store.finish_many([Outcome(id=c.id, token=c.lease_token, state="scheduled",
                                     delay_s=0, error='{"class": "unknown"}')])
    # A new item opens a new batch; the retried one keeps exactly its own.
    newer = enqueue(sql, "b", {"day": "mon", "late": True}, 2)[0]
    assert newer != mon
    again = [x for x in await claim(store, "b", 10) if x.id == mon]
    assert msgspec.json.decode(again[0].args) == {"items": [{"day": "mon"}]}


async def test_a_cancelled_open_batch_keeps_its_items_in_its_args(store, sql):
    await declare(store, b={"batch_size": 10, "batch_timeout_s": 60.0})
    job_id = enqueue(sql, "b", {"i": 1}, 0)[0]
    enqueue(sql, "b", {"i": 2}, 0)
    assert await store.cancel(job_id) == ("scheduled", "cancelled")
    row = job(sql, job_id)
    assert row["args"] == '{"items": [{"i": 1}, {"i": 2}]}'
    assert sql.fetchval("SELECT count(*) FROM jobd.batch_items") == 0


# --------------------------------------------------------------------------- throttle


async def test_throttle_drop_records_the_excess_as_skipped(store, sql):
    await declare(store, t={"throttle_per_s": 1.0, "throttle_burst": 2, "throttle_mode": "drop",
                            "throttle_field": "user"})
    got = [enqueue(sql, "t", {"user": "u1"}, 0)[2] for _ in range(3)]
    assert got == ["created", "created", "skipped_throttle"]
    assert enqueue(sql, "t", {"user": "u2"}, 0)[2] == "created"  # its own bucket
    assert enqueue(sql, "t", {"user": "u1"}, 0.5)[2] == "skipped_throttle"
    assert enqueue(sql, "t", {"user": "u1"}, 1.0)[2] == "created"
    skipped = sql.fetch("SELECT state, finished_at, errors::text FROM jobd.jobs "
                        "WHERE state = 'skipped'")
    assert len(skipped) == 2
    assert "throttle" in skipped[0]["errors"] and skipped[0]["finished_at"] is not None


async def test_throttle_delay_spaces_the_excess(store, sql):
    await declare(store, t={"throttle_per_s": 2.0, "throttle_mode": "delay"})
    ids = [enqueue(sql, "t", {}, 0)[0] for _ in range(4)]
    assert [job(sql, i)["run_at"] for i in ids] == [at(0), at(0.5), at(1.0), at(1.5)]
    assert len(await claim(store, "t", 0.6)) == 2


# --------------------------------------------------------------------------- singleton


async def test_singleton_skip_while_one_is_queued_or_running(store, sql):
    await declare(store, s={"singleton_mode": "skip", "singleton_field": "acct"})
    first = enqueue(sql, "s", {"acct": "a"}, 0)
    assert first[2] == "created"
    assert enqueue(sql, "s", {"acct": "a"}, 0)[2] == "skipped_singleton"
    assert enqueue(sql, "s", {"acct": "b"}, 0)[2] == "created"
    [c] = [x for x in await claim(store, "s", 0) if x.id == first[0]]
    assert enqueue(sql, "s", {"acct": "a"}, 1)[2] == "skipped_singleton"
    await store.finish_many([Outcome(id=c.id, token=c.lease_token, state="completed")])
    assert enqueue(sql, "s", {"acct": "a"}, 2)[2] == "created"


async def test_singleton_cancel_cancels_the_running_one_and_the_new_one_waits(store, sql):
    await declare(store, s={"singleton_mode": "cancel", "singleton_field": "acct"})
    old = enqueue(sql, "s", {"acct": "a", "v": 1}, 0)[0]
    [c] = await claim(store, "s", 0)
    new = enqueue(sql, "s", {"acct": "a", "v": 2}, 1)[0]
    assert job(sql, old)["cancel_requested"] is True
    assert job(sql, new)["state"] == "waiting"
    assert await claim(store, "s", 2) == []
    await store.finish_many([Outcome(id=c.id, token=c.lease_token, state="cancelled")])
    assert job(sql, new)["state"] == "available"
    # A queued holder is cancelled at once and the newest runs.
    newest = enqueue(sql, "s", {"acct": "a", "v": 3}, 3)[0]
    assert job(sql, new)["state"] == "cancelled"
    assert [x.id for x in await claim(store, "s", 4)] == [newest]


# --------------------------------------------------------------------------- unique windows


async def test_unique_for_keeps_the_key_taken_after_the_job_finishes(store, sql):
    await declare(store, u={"unique_for_s": 3600.0})
    job_id = enqueue(sql, "u", {}, 0, unique_key="daily:1")[0]
    [c] = await claim(store, "u", 0)
    await store.finish_many([Outcome(id=c.id, token=c.lease_token, state="completed")])
    finished = job(sql, job_id)["finished_at"]
    # finish_many uses the database's clock: measure the window from its finished_at.
    base = (finished - T0).total_seconds()
    assert enqueue(sql, "u", {}, base + 60, unique_key="daily:1") == (job_id, False, "duplicate")
    fresh = enqueue(sql, "u", {}, base + 3601, unique_key="daily:1")
    assert fresh[1:] == (True, "created")


async def test_unique_mode_replace_swaps_the_queued_args(store, sql):
    await declare(store, r={"unique_mode": "replace"})
    job_id = enqueue(sql, "r", {"v": 1}, 0, unique_key="id-7")[0]
    assert enqueue(sql, "r", {"v": 2}, 1, unique_key="id-7") == (job_id, False, "replaced")
    assert msgspec.json.decode(job(sql, job_id)["args"]) == {"v": 2}
    [c] = await claim(store, "r", 2)
    assert enqueue(sql, "r", {"v": 3}, 3, unique_key="id-7") == (job_id, False, "duplicate")
    assert msgspec.json.decode(c.args) == {"v": 2}


# --------------------------------------------------------------------------- every path


async def test_sql_enqueue_applies_the_kinds_tools(store, sql):
    await declare(store, d={"debounce_s": 5.0, "debounce_field": "m"})
    a = sql.fetchval("SELECT jobd.enqueue('d', '{\"m\": \"ebay\", \"n\": 1}')")
    b = sql.fetchval("SELECT jobd.enqueue('d', '{\"m\": \"ebay\", \"n\": 2}')")
    assert a == b
    assert msgspec.json.decode(job(sql, a)["args"])["n"] == 2


async def test_store_enqueue_mixes_plain_and_tool_rows_in_input_order(store, sql):
    await declare(store, b={"batch_size": 2, "batch_timeout_s": 60.0})
    rows = [NewJob(kind="plain", args="{}"), NewJob(kind="b", args='{"i": 1}', tool_keys={}),
            NewJob(kind="plain", args="{}"), NewJob(kind="b", args='{"i": 2}', tool_keys={})]
    done = await store.enqueue_many(rows)
    assert [d.outcome for d in done] == [None, "batched", None, "batched"]
    assert done[1].id == done[3].id and len({done[0].id, done[2].id, done[1].id}) == 3


async def test_kind_tools_refuses_values_out_of_range(store, sql):
    with pytest.raises(asyncpg.CheckViolationError):
        sql.execute("INSERT INTO jobd.kind_tools (kind, batch_size, batch_timeout_s) "
                    "VALUES ('x', 0, 1)")
    with pytest.raises(asyncpg.CheckViolationError):
        sql.execute("INSERT INTO jobd.kind_tools (kind, batch_size, batch_timeout_s, debounce_s) "
                    "VALUES ('x', 5, 1, 1)")


async def test_a_kind_declared_without_tools_loses_its_row(store, sql):
    await declare(store, d={"debounce_s": 5.0})
    await store.sync_kind_tools({"d": None})
    assert sql.fetchval("SELECT count(*) FROM jobd.kind_tools") == 0


async def test_children_a_handler_enqueues_go_through_the_tools(store, sql):
    await declare(store, b={"batch_size": 2, "batch_timeout_s": 60.0})
    [parent] = await store.enqueue_many([NewJob(kind="p")])
    done = await store.enqueue_children(parent.id, [
        NewJob(kind="b", args='{"i": 1}', tool_keys={}),
        NewJob(kind="b", args='{"i": 2}', tool_keys={})])
    assert [d.outcome for d in done] == ["batched", "batched"] and done[0].id == done[1].id
    row = job(sql, done[0].id)
    assert (row["parent_id"], row["state"], row["tool_count"]) == (parent.id, "available", 2)


async def test_a_batch_item_that_is_too_big_for_postgres_fails_its_enqueue_alone(store, sql):
    await declare(store, b={"batch_size": 2, "batch_timeout_s": 60.0})
    with pytest.raises(Exception, match="unsupported Unicode escape|NUL|0x00"):
        await store.enqueue_many([NewJob(kind="b", args='{"s": "a\\u0000b"}', tool_keys={})])
    done = await store.enqueue_many([NewJob(kind="b", args='{"s": "ok"}', tool_keys={})])
    assert done[0].outcome == "batched"


async def test_a_throttle_counts_runs_not_the_enqueues_a_debounce_folded(store, sql):
    await declare(store, dt={"debounce_s": 5.0, "throttle_per_s": 1 / 60, "throttle_mode": "drop"})
    first = enqueue(sql, "dt", {"n": 1}, 0)
    assert [enqueue(sql, "dt", {"n": n}, n)[2] for n in range(2, 6)] == ["debounced"] * 4
    await claim(store, "dt", 20)  # the pending run starts
    assert enqueue(sql, "dt", {"n": 9}, 21)[2] == "skipped_throttle"  # the second run in a minute
    assert enqueue(sql, "dt", {"n": 10}, 61)[2] == "created"
    assert first[2] == "created"


TRACE = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"


async def test_the_trace_context_travels_through_the_tools(store, sql):
    await declare(store, d={"debounce_s": 5.0}, b={"batch_size": 5, "batch_timeout_s": 5.0})
    d = sql.fetchval("SELECT jobd.enqueue('d', '{}', traceparent => $1)", TRACE)
    done = await store.enqueue_many([NewJob(kind="b", args="{}", tool_keys={}, traceparent=TRACE)])
    assert job(sql, d)["traceparent"] == TRACE == job(sql, done[0].id)["traceparent"]
    with pytest.raises(asyncpg.InvalidParameterValueError, match="traceparent"):
        sql.fetchval("SELECT jobd.enqueue('d', '{}', traceparent => 'nope')")


async def test_a_batch_stays_within_the_args_limit(store, sql):
    """Items that would make the sealed args too large for a job open the next batch."""
    sql.execute("INSERT INTO jobd.settings (name, value) VALUES ('max_args_bytes', '1024')")
    await declare(store, b={"batch_size": 100, "batch_timeout_s": 1.0})
    ids = [enqueue(sql, "b", {"s": "x" * 400, "i": i}, 0)[0] for i in range(5)]
    assert ids[0] == ids[1] != ids[2] == ids[3] != ids[4]
    for c in await claim(store, "b", 2):
        assert len(c.args) <= 1024 + 16


async def test_retention_prunes_skipped_rows_and_keeps_a_unique_for_window(store, sql):
    await declare(store, t={"throttle_per_s": 1.0, "throttle_mode": "drop"},
                  u={"unique_for_s": 3600.0})
    enqueue(sql, "t", {}, 0)
    skipped = enqueue(sql, "t", {}, 0)[0]
    held = enqueue(sql, "u", {}, 0, unique_key="hold")[0]
    [c] = await claim(store, "u", 0)
    await store.finish_many([Outcome(id=c.id, token=c.lease_token, state="completed")])
    finished = job(sql, held)["finished_at"]
    assert await store.prune_finished("skipped", 0, 0, 100, now=finished + timedelta(days=1)) == 1
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE id = $1", skipped) == 0
    # Within the window the holder stays, whatever retention says; after it, it goes.
    assert await store.prune_finished("completed", 0, 0, 100,
                                      now=finished + timedelta(minutes=30)) == 0
    assert await store.prune_finished("completed", 0, 0, 100,
                                      now=finished + timedelta(hours=2)) == 1
