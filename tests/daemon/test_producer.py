"""The direct producer against a real Postgres: the same rows, results and error codes as
an enqueue over the socket, inside the caller's transaction, and a real daemon woken by
its NOTIFY.

The producer is asyncio code (asyncpg); these tests run it on a private asyncio loop
(tests.support.run_async), except the one that runs it from trio through trio-asyncio.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import pytest

from actors.handlers import Handlers
from daemon.producer import APPLICATION_NAME, DirectProducer
from daemon.store import bridge
from daemon.store.migrate import apply
from protocol import SyncClient
from protocol.errors import ErrorCode, JobdError, Unavailable
from protocol.jobs import JobSpec
from tests.support import ROOT, Sql, run_async, wait_until


class Charge(msgspec.Struct):
    shop: str
    tokens: int = 1


def charge_handlers() -> Handlers:
    """A registry of our own, so nothing leaks into the daemon's HANDLERS."""
    handlers = Handlers()

    @handlers.job("charge", queue="billing", priority=3, max_attempts=7, timeout="90s",
                  key=lambda a: f"shop:{a.shop}", cost=lambda a: a.tokens)
    async def charge(ctx: Any, args: Charge) -> None:
        return None

    return handlers


@pytest.fixture
def db(fresh_database: str) -> str:
    """A fresh database with jobd's schema (as a daemon's first start leaves it)."""
    async def migrate() -> None:
        conn = await asyncpg.connect(fresh_database)
        try:
            await apply(conn)
        finally:
            await conn.close()

    run_async(migrate)
    return fresh_database


def produce(url: str, body: Callable[[DirectProducer], Awaitable[Any]], **options: Any) -> Any:
    """`await body(producer)` with a producer on `url`, on a private asyncio loop."""
    async def main() -> Any:
        async with DirectProducer(url, **options) as producer:
            return await body(producer)

    return run_async(main)


def refusal(url: str, body: Callable[[DirectProducer], Awaitable[Any]], **options: Any) -> JobdError:
    with pytest.raises(JobdError) as caught:
        produce(url, body, **options)
    return caught.value


# What an enqueue decides (a daemon may have run the jobs since: state is not compared).
COLUMNS = ("kind, args::text AS args, queue, key, unique_key, priority, max_attempts, "
           "timeout_s, cost, tags, parent_id, "
           "run_at > created_at + interval '3500 seconds' AS delayed")


def rows(sql: Sql, ids: list[int]) -> list[dict[str, Any]]:
    found = sql.fetch(f"SELECT id, {COLUMNS} FROM jobd.jobs WHERE id = ANY($1) ORDER BY id", ids)
    by_id = {r["id"]: {**dict(r), "args": json.loads(r["args"])} for r in found}
    for r in by_id.values():
        del r["id"]
    return [by_id[i] for i in ids]


def count(sql: Sql) -> int:
    return sql.fetchval("SELECT count(*) FROM jobd.jobs")


# -- the same as the socket -----------------------------------------------------------


def test_rows_results_and_unique_keys_are_the_socket_paths(jobd, sql, empty_handlers) -> None:
    daemon = jobd(modules=["tests.e2e.builder_handlers"])
    client = SyncClient(str(daemon.socket))
    url = sql.url
    one = {"args": {"shop": "acme", "tokens": 5}, "tags": ["a", "b"], "priority": -2}
    batch = [JobSpec(kind="builder.charge", args={"shop": "s1"}),
             JobSpec(kind="builder.charge", args={"shop": "s2", "tokens": 9}, queue="other",
                     delay_s=3600, max_attempts=2, timeout_s=5, cost=0),
             JobSpec(kind="builder.charge", args={"shop": "s3"}, key="k", tags=["t"],
                     priority=9)]

    by_socket = client.enqueue("builder.charge", **one)
    socket_batch = client.enqueue_batch(batch)

    async def direct(producer: DirectProducer) -> Any:
        done = await producer.enqueue("builder.charge", **one)
        many = await producer.enqueue_many(batch)
        as_dicts = await producer.enqueue_many([msgspec.to_builtins(s) for s in batch])
        return done, many, as_dicts

    by_direct, direct_batch, dict_batch = produce(url, direct,
                                                  modules=["tests.e2e.builder_handlers"])
    assert by_direct.created and by_direct.warning is None and by_socket.warning is None
    assert direct_batch.created == 3 and len(direct_batch.ids) == 3
    assert direct_batch.warning == socket_batch.warning  # queue "other": nobody serves it
    assert "no live daemon serves queue 'other'" in (direct_batch.warning or "")
    assert rows(sql, [by_direct.id]) == rows(sql, [by_socket.id])
    assert rows(sql, direct_batch.ids) == rows(sql, socket_batch.ids)
    assert rows(sql, dict_batch.ids) == rows(sql, socket_batch.ids)
    # What the declaration gave: the builder ran, key and cost functions included.
    [charged] = rows(sql, [by_direct.id])
    assert (charged["queue"], charged["key"], charged["cost"], charged["max_attempts"]) == \
        ("builder", "shop:acme", 5, 7)

    # A unique key held by an unfinished job: its id and created=False, either way round.
    first = client.enqueue("builder.charge", {"shop": "u"}, unique_key="u1", delay_s=600)

    async def duplicates(producer: DirectProducer) -> Any:
        again = await producer.enqueue("builder.charge", {"shop": "u"}, unique_key="u1")
        fresh = await producer.enqueue("builder.charge", {"shop": "u"}, unique_key="u2",
                                       delay_s=600)
        twice = await producer.enqueue_many([
            JobSpec(kind="builder.charge", args={"shop": "u"}, unique_key="u3", delay_s=600),
            JobSpec(kind="builder.charge", args={"shop": "u"}, unique_key="u3", delay_s=600)])
        return again, fresh, twice

    again, fresh, twice = produce(url, duplicates, modules=["tests.e2e.builder_handlers"])
    assert (again.id, again.created) == (first.id, False)
    socket_again = client.enqueue("builder.charge", {"shop": "u"}, unique_key="u2")
    assert (socket_again.id, socket_again.created) == (fresh.id, False)
    assert twice.ids[0] == twice.ids[1] and twice.created == 1
    socket_twice = client.enqueue_batch([
        JobSpec(kind="builder.charge", args={"shop": "u"}, unique_key="u3")] * 2)
    assert socket_twice.ids == twice.ids and socket_twice.created == 0


def test_a_daemon_runs_a_directly_enqueued_job_at_once(jobd, sql) -> None:
    """The insert's NOTIFY wakes the daemon: with a 30 s poll, only it can be this quick."""
    daemon = jobd(jobs={"poll_interval": "30s"})
    time.sleep(1.0)  # past the start-up claims: the dispatcher now waits
    url = sql.url
    started = time.monotonic()
    done = produce(url, lambda p: p.enqueue("sleep", {"seconds": 0.01, "steps": 1}),
                   require_handler=False)
    state = wait_until(lambda: sql.fetchval(
        "SELECT state FROM jobd.jobs WHERE id = $1 AND state = 'completed'", done.id),
        "the job to complete", timeout=20, daemons=(daemon,))
    elapsed = time.monotonic() - started
    assert state == "completed"
    assert elapsed < 5.0, f"took {elapsed:.2f} s: the NOTIFY did not wake the daemon"


# -- transactions and connections --------------------------------------------------------


def test_the_job_exists_only_if_the_callers_transaction_commits(db, sql) -> None:
    async def main() -> tuple[int, int]:
        conn = await asyncpg.connect(db)
        producer = DirectProducer(conn, handlers=charge_handlers())
        try:
            tx = conn.transaction()
            await tx.start()
            lost = await producer.enqueue("charge", {"shop": "a"}, connection=conn)
            await tx.rollback()
            async with conn.transaction():
                kept = await producer.enqueue("charge", {"shop": "b"})
            return lost.id, kept.id
        finally:
            await conn.close()

    lost, kept = run_async(main)
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE id = $1", lost) == 0
    assert [r["args"] for r in rows(sql, [kept])] == [{"shop": "b", "tokens": 1}]


def test_a_pool_of_the_callers_and_a_connection_per_call(db, sql) -> None:
    async def main() -> list[int]:
        pool = await asyncpg.create_pool(db, min_size=1, max_size=2)
        try:
            producer = DirectProducer(pool, handlers=charge_handlers())
            first = await producer.enqueue("charge", {"shop": "p"})
            async with pool.acquire() as conn, conn.transaction():
                second = await producer.enqueue("charge", {"shop": "q"}, connection=conn)
            await producer.close()  # not ours: the pool stays open
            third = await producer.enqueue("charge", {"shop": "r"})
            return [first.id, second.id, third.id]
        finally:
            await pool.close()

    ids = run_async(main)
    assert [r["key"] for r in rows(sql, ids)] == ["shop:p", "shop:q", "shop:r"]


# -- refusals: typed, and nothing written --------------------------------------------------


def test_args_are_checked_against_the_handlers_struct(db, sql) -> None:
    handlers = charge_handlers()
    bad_type = refusal(db, lambda p: p.enqueue("charge", {"shop": 7}), handlers=handlers)
    assert bad_type.code == ErrorCode.INVALID_ARGS
    assert "Expected `str`, got `int` - at `$.shop`" in bad_type.message
    misspelt = refusal(db, lambda p: p.enqueue("charge", {"shop": "a", "tokns": 2}),
                       handlers=handlers)
    assert misspelt.code == ErrorCode.INVALID_ARGS and misspelt.details["field"] == "$.tokns"
    in_batch = refusal(db, lambda p: p.enqueue_many([
        {"kind": "charge", "args": {"shop": "a"}}, {"kind": "charge", "args": {}}]),
        handlers=handlers)
    assert in_batch.code == ErrorCode.INVALID_ARGS and in_batch.details["index"] == 1
    assert count(sql) == 0


def test_a_kind_without_its_handler_gets_the_generic_checks_and_jobds_defaults(db, sql) -> None:
    done = produce(db, lambda p: p.enqueue("elsewhere", {"anything": [1, 2]}),
                   handlers=Handlers())
    [row] = rows(sql, [done.id])
    assert (row["queue"], row["priority"], row["max_attempts"], row["cost"],
            row["timeout_s"]) == ("default", 0, 3, 1, None)
    unknown = refusal(db, lambda p: p.enqueue("elsewhere", {}), handlers=Handlers(),
                      require_handler=True)
    assert unknown.code == ErrorCode.UNKNOWN_KIND
    nul = refusal(db, lambda p: p.enqueue("elsewhere", {"a": "x\x00y"}), handlers=Handlers())
    assert nul.code == ErrorCode.INVALID_ARGS and "NUL" in nul.message
    assert count(sql) == 1


@pytest.mark.parametrize(("options", "code", "words"), [
    ({"priority": 40000}, ErrorCode.BAD_REQUEST, "Expected `int` <= 32767 - at `$.job.priority`"),
    ({"priority": -40000}, ErrorCode.BAD_REQUEST, ">= -32768"),
    ({"key": "a\x00b"}, ErrorCode.BAD_REQUEST, "$.job.key"),
    ({"tags": ["x" * 300]}, ErrorCode.BAD_REQUEST, "$.job.tags[0]"),
    ({"delay_s": -1}, ErrorCode.BAD_REQUEST, "$.job.delay_s"),
    ({"run_at": "2999-01-01T00:00:00Z"}, ErrorCode.BAD_REQUEST, "run_at: at most"),
    ({"cost": 2 * 10**9}, ErrorCode.BAD_REQUEST, "$.job.cost"),
    ({"max_attempts": 0}, ErrorCode.BAD_REQUEST, "$.job.max_attempts"),
    ({"queue": ""}, ErrorCode.BAD_REQUEST, "$.job.queue"),
    ({"colour": "red"}, ErrorCode.BAD_REQUEST, "unknown field `colour`"),
    ({"kind": "elsewhere", "args": {"blob": "x" * 2000}}, ErrorCode.TOO_LARGE, "over the limit of 1000 bytes"),
    ({"args": {"s": object()}}, ErrorCode.BAD_REQUEST, "cannot encode"),
    ({"traceparent": "00-abc-def-01"}, ErrorCode.BAD_REQUEST, "$.job.traceparent"),
    ({"traceparent": 7}, ErrorCode.BAD_REQUEST, "$.job.traceparent"),
])
def test_out_of_range_values_are_the_socket_paths_refusals(db, sql, options, code, words) -> None:
    # The daemons' published args limit applies (lifecycle.publish writes it at start).
    sql.execute("INSERT INTO jobd.settings (name, value) VALUES ('max_args_bytes', '1000')")
    options = dict(options)
    args = options.pop("args", {"shop": "a"})
    kind = options.pop("kind", "charge")
    error = refusal(db, lambda p: p.enqueue(kind, args, **options),
                    handlers=charge_handlers())
    assert error.code == code, error.message
    assert words in error.message
    assert count(sql) == 0


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_producers_traceparent_is_stored_with_its_jobs(db, sql) -> None:
    async def body(p: DirectProducer) -> list[int]:
        one = await p.enqueue("charge", {"shop": "a"}, traceparent=TRACEPARENT)
        many = await p.enqueue_many([{"kind": "charge", "args": {"shop": str(i)},
                                      "traceparent": TRACEPARENT} for i in range(200)])
        plain = await p.enqueue("charge", {"shop": "b"})
        return [one.id, *many.ids, plain.id]

    ids = produce(db, body, handlers=charge_handlers())
    held = sql.fetch("SELECT traceparent FROM jobd.jobs WHERE id = ANY($1) ORDER BY id", ids)
    # 200 jobs go by COPY, the single ones by the statement: both store it.
    assert [r["traceparent"] for r in held] == [TRACEPARENT] * 201 + [None]


def test_an_enqueue_in_an_aborted_transaction_is_bad_request(db, sql) -> None:
    async def main() -> JobdError:
        conn = await asyncpg.connect(db)
        try:
            async with conn.transaction():
                with pytest.raises(asyncpg.DivisionByZeroError):
                    await conn.execute("SELECT 1 / 0")
                with pytest.raises(JobdError) as caught:
                    await DirectProducer(conn, handlers=Handlers()).enqueue("x", {})
                raise caught.value
        finally:
            await conn.close()

    with pytest.raises(JobdError) as caught:
        run_async(main)
    assert caught.value.code == ErrorCode.BAD_REQUEST
    assert "transaction is aborted" in caught.value.message
    assert count(sql) == 0


def test_a_value_postgres_refuses_is_bad_request_and_aborts_only_a_savepoint(db, sql) -> None:
    sql.execute("ALTER TABLE jobd.jobs ADD CONSTRAINT no_evil CHECK (kind <> 'evil')")

    async def main() -> tuple[JobdError, int]:
        conn = await asyncpg.connect(db)
        producer = DirectProducer(conn, handlers=Handlers())
        try:
            async with conn.transaction():
                with pytest.raises(JobdError) as caught:
                    async with conn.transaction():  # a savepoint
                        await producer.enqueue("evil", {})
                kept = await producer.enqueue("good", {})
            return caught.value, kept.id
        finally:
            await conn.close()

    error, kept = run_async(main)
    assert error.code == ErrorCode.BAD_REQUEST and "no_evil" in error.message, error.message
    assert [r["kind"] for r in rows(sql, [kept])] == ["good"]
    assert count(sql) == 1


# -- Postgres not there ---------------------------------------------------------------------


def test_postgres_down_is_unavailable_in_one_line() -> None:
    for body in (lambda p: p.open(), lambda p: p.enqueue("noop", {})):
        async def main(body: Any = body) -> None:
            producer = DirectProducer("postgresql://jobd@127.0.0.1:1/jobd", timeout=5)
            try:
                await body(producer)
            finally:
                await producer.close()

        with pytest.raises(Unavailable) as caught:
            run_async(main)
        error = caught.value
        assert error.code == ErrorCode.UNAVAILABLE
        assert "\n" not in error.message and "127.0.0.1:1" in error.message, error.message


def test_a_database_without_jobds_schema_is_unavailable_naming_why(fresh_database) -> None:
    error = refusal(fresh_database, lambda p: p.enqueue("noop", {}))
    assert error.code == ErrorCode.UNAVAILABLE and "no jobd schema" in error.message


def test_a_role_without_rights_is_unauthorized_and_a_bad_url_bad_request(db, sql) -> None:
    role = f"jobd_nobody_{time.time_ns() % 10**9}"
    sql.execute(f"CREATE ROLE {role} LOGIN")
    try:
        as_role = urlunsplit(urlsplit(db)._replace(netloc=f"{role}@"))
        denied = refusal(as_role, lambda p: p.enqueue("noop", {}))
        assert denied.code == ErrorCode.UNAUTHORIZED and "permission denied" in denied.message
    finally:
        sql.execute(f"DROP OWNED BY {role}")
        sql.execute(f"DROP ROLE {role}")
    bad = refusal("postgresql://x@127.0.0.1:1/x?sslmode=sometimes", lambda p: p.open())
    assert bad.code == ErrorCode.BAD_REQUEST and "sslmode" in bad.message


def test_a_handler_module_that_does_not_import_is_a_typed_error() -> None:
    with pytest.raises(JobdError) as caught:
        DirectProducer("postgresql://x@127.0.0.1:1/x", modules=["tests.no_such_module"])
    assert caught.value.code == ErrorCode.BAD_REQUEST
    assert "tests.no_such_module" in caught.value.message


# -- the application's loop ---------------------------------------------------------------


def test_importing_the_producer_leaves_the_applications_asyncio_alone() -> None:
    """The producer brings the store into a FastAPI process: importing it must not change
    what loop that process gets (no event loop policy set, no trio-asyncio)."""
    probe = ("import asyncio, sys; import daemon.producer; "
             "print('trio_asyncio' in sys.modules, type(asyncio.new_event_loop()).__module__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "asyncio.unix_events"]


# -- from trio ---------------------------------------------------------------------------


async def test_from_trio_through_the_bridge(db, sql) -> None:
    async with bridge.open_loop():
        producer = DirectProducer(db, handlers=charge_handlers())
        await bridge.call(producer.open)
        try:
            done = await bridge.call(producer.enqueue, "charge", {"shop": "t"})
        finally:
            await bridge.call(producer.close)
    assert [r["key"] for r in rows(sql, [done.id])] == ["shop:t"]


def test_a_unique_key_taken_after_a_repeatable_read_snapshot_is_a_conflict_to_retry(db, sql) -> None:
    """Inside the caller's REPEATABLE READ (or SERIALIZABLE) transaction, a unique key
    another transaction took after the snapshot cannot be answered "already there, here
    is its id" (the row is invisible): it is a typed conflict saying to retry the
    transaction, which then sees the job and gets created=False."""

    async def main() -> tuple[JobdError | None, Any, int]:
        conn = await asyncpg.connect(db)
        other = await asyncpg.connect(db)
        producer = DirectProducer(conn, handlers=charge_handlers())
        try:
            tx = conn.transaction(isolation="repeatable_read")
            await tx.start()
            await conn.fetchval("SELECT count(*) FROM jobd.jobs")  # the snapshot is taken
            async with other.transaction():
                first = await DirectProducer(other, handlers=charge_handlers()).enqueue(
                    "charge", {"shop": "rr"}, unique_key="rr-1", connection=other)
            refused: JobdError | None = None
            try:
                await producer.enqueue("charge", {"shop": "rr"}, unique_key="rr-1",
                                       connection=conn)
            except JobdError as exc:
                refused = exc
            await tx.rollback()
            async with conn.transaction(isolation="repeatable_read"):
                again = await producer.enqueue("charge", {"shop": "rr"}, unique_key="rr-1",
                                               connection=conn)
            return refused, again, first.id
        finally:
            await conn.close()
            await other.close()

    refused, again, first_id = run_async(main)
    assert refused is not None
    assert refused.code == ErrorCode.CONFLICT, refused
    assert "retry the transaction" in refused.message and "\n" not in refused.message
    assert (again.id, again.created) == (first_id, False)
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE unique_key = 'rr-1'") == 1
# -- flow-control tools -------------------------------------------------------------


def test_a_kind_with_tools_goes_through_them_without_its_module(db, sql) -> None:
    """The producer has no handler for the kind, but a daemon published its tools."""
    sql.execute("INSERT INTO jobd.kind_tools (kind, debounce_s, debounce_field) "
                "VALUES ('capture', 60, 'market')")

    async def body(producer: DirectProducer) -> Any:
        first = await producer.enqueue("capture", {"market": "ebay", "n": 1})
        second = await producer.enqueue("capture", {"market": "ebay", "n": 2})
        return first, second

    first, second = produce(db, body)
    assert (first.outcome, second.outcome) == ("created", "debounced")
    assert second.id == first.id
    assert json.loads(sql.fetchval("SELECT args::text FROM jobd.jobs WHERE id = $1", first.id)) == {
        "market": "ebay", "n": 2}


# -- group commit on the producer's pool ----------------------------------------------------


def test_concurrent_enqueues_share_statements_and_each_gets_its_own_outcome(db, sql) -> None:
    """64 tasks of one application enqueue at once: a few statements for all of them
    (the producer's group commit), each caller its own id, one unique key held by two
    callers is one job (the second told created=False); then a row Postgres refuses
    fails its caller alone."""
    sql.execute("ALTER TABLE jobd.jobs ADD CONSTRAINT no_evil CHECK (kind <> 'evil')")

    async def main() -> tuple[list[Any], int, list[Any]]:
        import asyncio

        async with DirectProducer(db, handlers=Handlers(), pool_size=2) as producer:
            async def one(i: int, kind: str = "good") -> Any:
                try:
                    return await producer.enqueue(kind, {"i": i},
                                                  unique_key="u" if i in (3, 40) else None)
                except JobdError as exc:
                    return exc
            outcomes = await asyncio.gather(*(one(i) for i in range(64)))
            writes = producer._commit.writes
            mixed = await asyncio.gather(*(one(100 + i, "evil" if i == 5 else "good")
                                           for i in range(16)))
            return outcomes, writes, mixed

    outcomes, writes, mixed = run_async(main)
    assert writes <= 3, writes  # the first caller alone, the rest together
    assert all(not isinstance(o, Exception) for o in outcomes)
    assert outcomes[3].id == outcomes[40].id
    assert sorted([outcomes[3].created, outcomes[40].created]) == [False, True]
    refused = mixed[5]
    assert isinstance(refused, JobdError) and refused.code == ErrorCode.BAD_REQUEST
    assert all(not isinstance(o, Exception) for i, o in enumerate(mixed) if i != 5)
    held = {r["id"]: r["args"] for r in sql.fetch("SELECT id, args FROM jobd.jobs")}
    assert len(held) == 63 + 15  # less the duplicate key, and the refused row
    for i, o in [*enumerate(outcomes), *((100 + i, o) for i, o in enumerate(mixed))]:
        if i not in (3, 40, 105):
            assert json.loads(held[o.id]) == {"i": i}


def test_postgres_down_fails_every_waiting_caller_with_unavailable() -> None:
    async def main() -> list[Any]:
        import asyncio

        producer = DirectProducer("postgresql://jobd@127.0.0.1:1/jobd", timeout=5)
        try:
            return await asyncio.gather(*(producer.enqueue("noop", {}) for _ in range(8)),
                                        return_exceptions=True)
        finally:
            await producer.close()

    outcomes = run_async(main)
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes


def test_group_committed_enqueues_survive_their_connections_being_killed(db, sql) -> None:
    """Postgres kills the producer's pooled connections between two waves of concurrent
    enqueues. A statement that meets a dead socket may have been sent, so its callers
    get `unavailable` (never another error, never a job written twice); a retry goes
    on a fresh connection, and every job ends up written exactly once."""
    async def main() -> tuple[list[Any], list[Any]]:
        import asyncio

        async with DirectProducer(db, handlers=Handlers(), pool_size=2) as producer:
            first = await asyncio.gather(*(producer.enqueue("good", {"i": i})
                                           for i in range(16)))
            killed = sql.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1", APPLICATION_NAME)
            assert killed >= 1
            second = await asyncio.gather(*(producer.enqueue("good", {"i": 16 + i})
                                            for i in range(16)), return_exceptions=True)
            failed = [16 + i for i, o in enumerate(second) if isinstance(o, Exception)]
            assert all(isinstance(o, Unavailable) for o in second if isinstance(o, Exception))
            retried = await asyncio.gather(*(producer.enqueue("good", {"i": i})
                                             for i in failed))
            return [*first, *second], retried

    outcomes, retried = run_async(main)
    ids = [o.id for o in [*outcomes, *retried] if not isinstance(o, Exception)]
    assert len(ids) == len(set(ids)) == 32
    held = sorted(json.loads(r["args"])["i"] for r in sql.fetch("SELECT args FROM jobd.jobs"))
    assert held == list(range(32))
