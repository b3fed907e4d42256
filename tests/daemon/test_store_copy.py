"""The COPY path of enqueue (store.jobs.copy_jobs) against a real Postgres: the same rows
as the statement path (ENQUEUE_MANY / ENQUEUE_CHILDREN) for the same input, ids in
input order, one transaction, one NOTIFY per queue, typed errors and outages.

The statement path is store.jobs.insert_rows, run on the store's own connection: the
comparison is between the two real paths on the same database."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import msgspec
import pytest
import trio

import daemon.store.jobs as store_jobs
from actors.ports import NewJob, StoreUnavailable, ValueRejected
from daemon.store import bridge
from daemon.store.sql import jobs as sql

N = store_jobs.COPY_MIN_ROWS + 72
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def varied(n: int, seed: int = 7) -> list[NewJob]:
    """Every column a NewJob sets, over its range (limits in README "Limits")."""
    rnd = random.Random(seed)
    return [NewJob(
        kind=rnd.choice(["k", "other.kind", "ü" * 200]),
        args=msgspec.json.encode({"i": i, "s": "x\\y\"z", "n": [1, None, 2.5]}).decode(),
        queue=rnd.choice(["default", "q2", "é" * 100]),
        key=rnd.choice([None, "acme", "k" * 512]),
        priority=rnd.choice([0, 1, -32768, 32767, rnd.randint(-100, 100)]),
        delay_s=rnd.choice([None, 0, 0.0, 1.5, 1e-7, 5e-7, 1.5e-6, 2.5e-6, rnd.uniform(0, 3600),
                            3650 * 86400.0]),
        max_attempts=rnd.choice([1, 3, 1000]),
        tags=rnd.choice([[], ["x"], ["y z", "t" * 256], [str(t) for t in range(100)]]),
        timeout_s=rnd.choice([None, 0.001, 9.5, 31536000.0]),
        cost=rnd.choice([1, 7, 10**9]),
        traceparent=rnd.choice([None, TRACEPARENT]),
    ) for i in range(n)]


# Everything a row holds, with run_at as its offset from created_at: the two paths run
# in different transactions, so their now() differ, and nothing else may.
ROWS = """
SELECT to_jsonb(j) - 'id' - 'created_at' - 'run_at' AS row,
       extract(epoch FROM run_at - created_at)::numeric AS delay
FROM jobd.jobs j WHERE id = ANY($1::bigint[]) ORDER BY id
"""


async def rows(store, ids: list[int]) -> list[tuple[str, object]]:
    return [(r["row"], r["delay"]) for r in await store._fetch(ROWS, ids)]


async def by_statement(store, jobs: list[NewJob], parent_id: int | None = None) -> list[int]:
    done = await store._run(store_jobs.insert_rows, jobs, parent_id, op="enqueue")
    return [d.id for d in done]


async def test_ids_come_back_in_input_order_and_are_what_postgres_holds(store, sql):
    jobs = [NewJob(kind="k", args=f'{{"i": {i}}}') for i in range(N)]
    done = await store.enqueue_many(jobs)
    assert all(d.created for d in done)
    ids = [d.id for d in done]
    assert ids == sorted(ids) and len(set(ids)) == N
    held = sql.fetch("SELECT id, (args->>'i')::int AS i FROM jobd.jobs ORDER BY id")
    assert [(r["id"], r["i"]) for r in held] == list(zip(ids, range(N), strict=True))
    # The sequence moved past them: the next job, whichever path, gets a fresh id.
    [after] = await store.enqueue_many([NewJob(kind="k")])
    assert after.id > ids[-1]


async def test_every_column_matches_the_statement_path(store):
    jobs = varied(N)
    copied = [d.id for d in await store.enqueue_many(jobs)]
    stated = await by_statement(store, jobs)
    assert len(set(copied) | set(stated)) == 2 * N
    assert await rows(store, copied) == await rows(store, stated)
    states = {r["state"] for r in await store._fetch(
        "SELECT DISTINCT state FROM jobd.jobs")}
    assert states == {"available", "scheduled"}


@pytest.mark.parametrize("field", [
    None, ("key", "acme"), ("delay_s", 2.5), ("tags", ["t"]), ("timeout_s", 9.5),
    ("cost", 3), ("priority", -5), ("max_attempts", 1), ("queue", "q2"),
    ("traceparent", TRACEPARENT),
])
async def test_a_uniform_batch_matches_the_statement_path(store, field):
    """Columns every row leaves at their default do not travel (copy_columns): what the
    table fills in for them must be what the statement writes."""
    plain = [NewJob(kind="k", args=f'{{"i": {i}}}') for i in range(N)]
    jobs = plain if field is None else [
        NewJob(**{**msgspec.structs.asdict(j), field[0]: field[1]}) for j in plain]
    copied = [d.id for d in await store.enqueue_many(jobs)]
    stated = await by_statement(store, jobs)
    assert await rows(store, copied) == await rows(store, stated)


def test_only_columns_some_row_needs_travel():
    now = datetime.now(UTC)
    jobs = [NewJob(kind="k")] * 3
    assert tuple(store_jobs.copy_columns(jobs, [1, 2, 3], now, None)) == sql.COPY_ALWAYS
    mixed = [NewJob(kind="k"), NewJob(kind="k", key="a", delay_s=1, tags=["t"],
                                     timeout_s=1, cost=2, traceparent=TRACEPARENT)]
    every = store_jobs.copy_columns(mixed, [1, 2], now, 9)
    assert tuple(every) == sql.COPY_ALWAYS + sql.COPY_OPTIONAL
    assert every["state"] == ["available", "scheduled"] and every["parent_id"] == [9, 9]


async def test_children_match_the_statement_path_with_their_parent(store):
    [parent] = await store.enqueue_many([NewJob(kind="parent")])
    jobs = varied(N, seed=11)
    copied = [d.id for d in await store.enqueue_children(parent.id, jobs)]
    stated = await by_statement(store, jobs, parent.id)
    got = await rows(store, copied)
    assert got == await rows(store, stated)
    assert {msgspec.json.decode(r)["parent_id"] for r, _ in got} == {parent.id}


async def by_conflict_statement(store, jobs: list[NewJob],
                                parent_id: int | None = None) -> list[int]:
    """ENQUEUE_MANY / ENQUEUE_CHILDREN, the path of batches with unique keys."""
    async def run(connection):
        if parent_id is None:
            return await connection.fetch(sql.ENQUEUE_MANY, store_jobs.job_rows_json(jobs))
        return await connection.fetch(sql.ENQUEUE_CHILDREN, store_jobs.job_rows_json(jobs),
                                      parent_id)
    return [r["id"] for r in await store._run(run, op="enqueue")]


@pytest.mark.parametrize("n", [1, 2, 50])
async def test_a_small_batch_without_unique_keys_matches_the_conflict_statement(store, n):
    """ENQUEUE_PLAIN (no unique keys: no conflict joins) writes what ENQUEUE_MANY writes,
    and its ids come back in input order, for top-level jobs and for children."""
    jobs = varied(n, seed=n)
    plain = await by_statement(store, jobs)
    assert plain == sorted(plain) and len(set(plain)) == n
    assert await rows(store, plain) == await rows(store, await by_conflict_statement(store, jobs))
    held = [msgspec.json.decode(r)["args"]["i"] for r, _ in await rows(store, plain)]
    assert held == list(range(n))
    [parent] = await store.enqueue_many([NewJob(kind="parent")])
    children = await by_statement(store, jobs, parent.id)
    got = await rows(store, children)
    assert got == await rows(store, await by_conflict_statement(store, jobs, parent.id))
    assert {msgspec.json.decode(r)["parent_id"] for r, _ in got} == {parent.id}


async def test_a_batch_with_a_unique_key_takes_the_statement_and_dedupes(store):
    jobs = [NewJob(kind="k", args=f'{{"i": {i}}}') for i in range(N)]
    jobs[3] = NewJob(kind="k", unique_key="u")
    jobs[N - 1] = NewJob(kind="k", unique_key="u")
    done = await store.enqueue_many(jobs)
    assert done[N - 1].id == done[3].id and done[N - 1].created is False
    assert sum(d.created for d in done) == N - 1
    assert await store.stats() == [("default", "available", N - 1)]
    # Held unfinished, the key maps a later batch's row to it as well.
    again = await store.enqueue_many([NewJob(kind="k", unique_key="u")] + jobs[:N - 1])
    assert again[0].id == done[3].id and again[0].created is False


@pytest.mark.parametrize("bad", [
    {"cost": 0},                            # CHECK jobs_cost_positive
    {"timeout_s": 0.0},                     # CHECK jobs_timeout_range
    {"args": "[1]x"},                       # not JSON
    {"args": '{"a": "\\u0000"}'},           # jsonb cannot hold U+0000
    {"kind": "a\x00b"},                     # text cannot either
    {"priority": 40000},                    # not a smallint: refused by asyncpg's encoder
    {"kind": "\ud800"},                     # not UTF-8 at all
])
async def test_a_bad_row_rolls_the_whole_batch_back_with_a_typed_error(store, bad):
    jobs = [NewJob(kind="k") for _ in range(N)]
    jobs[N // 2] = NewJob(**{"kind": "k", **bad})
    with pytest.raises(ValueRejected):
        await store.enqueue_many(jobs)
    assert await store.stats() == []
    # The connection went back to the pool out of its transaction: the next batch works.
    assert len(await store.enqueue_many(jobs[:N // 2] * 2)) == N // 2 * 2


async def test_one_notify_per_queue_wakes_the_claimers(store):
    send, receive = trio.open_memory_channel[tuple[str, str]](100)
    async with store.listen(["jobd_enqueued"], send, lambda *_: None):
        assert await receive.receive() == ("jobd_enqueued", "")  # connected
        jobs = [NewJob(kind="k", queue="a" if i % 3 else "b") for i in range(N)]
        await store.enqueue_many(jobs)
        heard = []
        with trio.move_on_after(1.0):
            while True:
                heard.append(await receive.receive())
    assert sorted(heard) == [("jobd_enqueued", "a"), ("jobd_enqueued", "b")]


async def _backend_pid(admin, query_prefix: str, state: str = "active") -> int:
    with trio.fail_after(10):
        while True:
            pid = await bridge.call(
                admin.fetchval,
                "SELECT pid FROM pg_stat_activity WHERE query LIKE $1 AND state = $2",
                query_prefix + "%", state)
            if pid is not None:
                return pid
            await trio.sleep(0.01)


async def test_a_connection_killed_mid_copy_is_unavailable_and_writes_nothing(store):
    """A lock the COPY must wait for holds it in flight (its ids drawn, its transaction
    open) until its backend is terminated: the caller hears `unavailable`, no row of
    the batch exists, and the store carries on with a fresh connection."""
    admin = await bridge.connect(store.url, 10)
    blocker = await bridge.connect(store.url, 10)
    outcome: list[BaseException | None] = []
    jobs = [NewJob(kind="k") for _ in range(N)]

    async def enqueue() -> None:
        try:
            await store.enqueue_many(jobs)
            outcome.append(None)
        except StoreUnavailable as exc:
            outcome.append(exc)

    try:
        await bridge.call(blocker.execute, "BEGIN; LOCK TABLE jobd.jobs IN SHARE MODE")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(enqueue)
            pid = await _backend_pid(admin, "COPY ")
            assert await bridge.call(admin.fetchval, "SELECT pg_terminate_backend($1)", pid)
        await bridge.call(blocker.execute, "COMMIT")
    finally:
        # On the loop thread, as every use of a connection must be: closing its uvloop
        # transport from this thread crashed the process (SIGSEGV) about once in ten runs.
        bridge.terminate(admin)
        bridge.terminate(blocker)
    assert len(outcome) == 1 and isinstance(outcome[0], StoreUnavailable)
    assert await store.stats() == []
    done = await store.enqueue_many(jobs)
    assert len(done) == N and await store.stats() == [("default", "available", N)]

