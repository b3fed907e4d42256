"""Group commit against the real store: concurrent single enqueues share statements,
and each caller still gets its own outcome (its id, its unique-key answer, its error,
its cancellation).

The first write is held at a gate so the callers after it gather deterministically;
`wait_all_tasks_blocked` says when they all wait.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from actors.ports import Enqueued, NewJob, StoreUnavailable, ValueRejected
from actors.services.enqueuer import Enqueuer
from protocol import commands as c
from protocol.errors import ErrorCode, JobdError
from protocol.jobs import JobSpec
from tests.actors.services.test_control import control

REFUSED = NewJob(kind="work", args='{"a": "\\u0000"}')  # jsonb cannot hold a NUL


class Gated:
    """The store's enqueue_many, recording each statement's size; the first one waits
    at `gate` (once the test opens it, every later one goes straight through)."""

    def __init__(self, store: Any, fail: dict[int, Exception] | None = None,
                 hold_after: bool = False):
        self.store = store
        self.hold_after = hold_after  # hold the first statement once it has run
        self.sizes: list[int] = []
        self.entered = trio.Event()
        self.gate = trio.Event()
        self.fail = fail or {}  # statement number -> what it raises

    async def enqueue_many(self, rows: list[NewJob]) -> list[Enqueued]:
        self.sizes.append(len(rows))
        held = len(self.sizes) == 1
        if held and not self.hold_after:
            self.entered.set()
            await self.gate.wait()
        if (exc := self.fail.get(len(self.sizes))) is not None:
            raise exc
        done: list[Enqueued] = await self.store.enqueue_many(rows)
        if held and self.hold_after:
            self.entered.set()
            await self.gate.wait()
        return done

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def gathered(enqueuer: Enqueuer, gated: Gated, first: NewJob,
                   rows: list[NewJob]) -> tuple[Any, list[Any]]:
    """`first` holds the gate; `rows` arrive while it writes. Each outcome is an
    Enqueued or the exception its caller got."""
    outcomes: list[Any] = [None] * (len(rows) + 1)

    async def one(i: int, row: NewJob) -> None:
        try:
            outcomes[i] = await enqueuer.enqueue(row)
        except Exception as exc:
            outcomes[i] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, 0, first)
        await gated.entered.wait()
        for i, row in enumerate(rows, 1):
            nursery.start_soon(one, i, row)
        await trio.testing.wait_all_tasks_blocked()
        gated.gate.set()
    return outcomes[0], outcomes[1:]


async def test_an_idle_caller_writes_at_once_alone(store):
    gated = Gated(store)
    gated.gate.set()
    done = await Enqueuer(gated.enqueue_many).enqueue(NewJob(kind="work"))
    assert done.created and gated.sizes == [1]
    assert (await store.get_job(done.id))["kind"] == "work"


async def test_callers_during_a_write_go_together_in_the_next(store, sql):
    gated = Gated(store)
    first, rest = await gathered(Enqueuer(gated.enqueue_many), gated, NewJob(kind="lead"),
                                 [NewJob(kind="work", args=f'{{"n": {i}}}') for i in range(20)])
    assert gated.sizes == [1, 20]
    assert first.created and all(d.created for d in rest)
    assert len({first.id, *(d.id for d in rest)}) == 21
    for i, d in enumerate(rest):  # each caller's id is its own row
        assert sql.fetchval("SELECT args->>'n' FROM jobd.jobs WHERE id = $1", d.id) == str(i)


async def test_a_statement_holds_at_most_max_rows(store):
    gated = Gated(store)
    _, rest = await gathered(Enqueuer(gated.enqueue_many, max_rows=3), gated,
                             NewJob(kind="lead"), [NewJob(kind="work") for _ in range(7)])
    assert gated.sizes == [1, 3, 3, 1]
    assert len({d.id for d in rest}) == 7


async def test_one_unique_key_from_two_callers_in_one_batch_is_one_job(store, sql):
    gated = Gated(store)
    _, rest = await gathered(Enqueuer(gated.enqueue_many), gated, NewJob(kind="lead"),
                             [NewJob(kind="work", unique_key="u"),
                              NewJob(kind="work"),
                              NewJob(kind="work", unique_key="u")])
    assert gated.sizes == [1, 3]
    a, other, b = rest
    assert a.id == b.id != other.id
    assert sorted([a.created, b.created]) == [False, True]  # whichever arrived first
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE unique_key = 'u'") == 1


async def test_a_value_postgres_refuses_fails_only_its_caller(store, sql):
    gated = Gated(store)
    _, rest = await gathered(Enqueuer(gated.enqueue_many), gated, NewJob(kind="lead"),
                             [NewJob(kind="work"), REFUSED, NewJob(kind="work")])
    good, bad, also_good = rest
    assert isinstance(bad, ValueRejected)
    assert good.created and also_good.created
    assert gated.sizes == [1, 3, 1, 1, 1]  # the batch, then row by row
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 3


async def test_an_unavailable_store_fails_every_caller_of_that_batch_only(store, sql):
    gated = Gated(store, fail={2: StoreUnavailable("database unavailable")})
    enqueuer = Enqueuer(gated.enqueue_many)
    first, rest = await gathered(enqueuer, gated, NewJob(kind="lead"),
                                 [NewJob(kind="work"), NewJob(kind="work")])
    assert first.created
    assert all(isinstance(e, StoreUnavailable) for e in rest) and rest[0] is not rest[1]
    assert (await enqueuer.enqueue(NewJob(kind="work"))).created  # the next one goes
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 2


async def test_a_waiting_caller_cancelled_takes_its_row_back(store, sql):
    gated = Gated(store)
    enqueuer = Enqueuer(gated.enqueue_many)
    outcomes: dict[str, Any] = {}
    scopes: dict[str, trio.CancelScope] = {}

    async def one(name: str) -> None:
        with trio.CancelScope() as scopes[name]:
            outcomes[name] = await enqueuer.enqueue(NewJob(kind="work", unique_key=name))
            return
        outcomes[name] = "cancelled"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "lead")
        await gated.entered.wait()
        for name in ("a", "b", "c"):
            nursery.start_soon(one, name)
        await trio.testing.wait_all_tasks_blocked()
        scopes["a"].cancel()  # the first waiter: it would have led the next write
        await trio.testing.wait_all_tasks_blocked()
        gated.gate.set()
    assert outcomes["a"] == "cancelled"
    assert outcomes["b"].created and outcomes["c"].created
    assert gated.sizes == [1, 2]
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE unique_key = 'a'") == 0


async def test_a_leader_cancelled_mid_write_finishes_it_and_loses_no_row(store, sql):
    gated = Gated(store)
    enqueuer = Enqueuer(gated.enqueue_many)
    outcomes: dict[str, Any] = {}

    async def one(name: str, scope: trio.CancelScope) -> None:
        with scope:
            outcomes[name] = await enqueuer.enqueue(NewJob(kind="work", unique_key=name))
            return
        outcomes[name] = "cancelled"

    lead = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "lead", lead)
        await gated.entered.wait()
        nursery.start_soon(one, "a", trio.CancelScope())
        await trio.testing.wait_all_tasks_blocked()
        lead.cancel()  # its client hung up while its statement runs
        await trio.testing.wait_all_tasks_blocked()
        gated.gate.set()
    # The statement ran to its end (shielded), so the leader still has its answer;
    # the cancel lands at its next checkpoint.
    assert outcomes["lead"].created and outcomes["a"].created
    assert gated.sizes == [1, 1]
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 2


async def test_control_enqueues_share_statements_and_validate_each_alone(store, sql):
    gated = Gated(store)
    ctl, _ = control(gated)
    specs = [JobSpec(kind="work", args={"n": 1}), JobSpec(kind="nosuch"),
             JobSpec(kind="work", args={"n": "x"}), JobSpec(kind="work", args={"n": 2})]
    outcomes: list[Any] = [None] * len(specs)

    async def one(i: int, spec: JobSpec) -> None:
        try:
            outcomes[i] = await ctl.handle(c.Enqueue(job=spec))
        except JobdError as exc:
            outcomes[i] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, 0, specs[0])
        await gated.entered.wait()
        for i, spec in enumerate(specs[1:], 1):
            nursery.start_soon(one, i, spec)
        await trio.testing.wait_all_tasks_blocked()
        gated.gate.set()
    good, unknown, invalid, also_good = outcomes
    assert isinstance(good, c.EnqueueResult) and isinstance(also_good, c.EnqueueResult)
    assert good.created and also_good.created and good.id != also_good.id
    assert unknown.code == ErrorCode.UNKNOWN_KIND
    assert invalid.code == ErrorCode.INVALID_ARGS
    assert gated.sizes == [1, 1]  # the two bad specs never reached the store
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 2


async def test_control_answers_a_refused_row_as_bad_request(store):
    gated = Gated(store, fail={1: ValueRejected("bad value")})
    gated.gate.set()
    ctl, _ = control(gated)
    with pytest.raises(JobdError) as info:
        await ctl.handle(c.Enqueue(job=JobSpec(kind="work")))
    assert info.value.code == ErrorCode.BAD_REQUEST


async def test_a_waiter_cancelled_as_the_lead_reaches_it_passes_the_lead_on(store, sql):
    # The cancel and the end of the write land in one step (the write is done, only
    # the gate holds its answer), so the leader may name the cancelled waiter the next
    # lead before it runs: either way the lead passes on and nobody waits forever.
    gated = Gated(store, hold_after=True)
    enqueuer = Enqueuer(gated.enqueue_many)
    outcomes: dict[str, Any] = {}
    scopes = {name: trio.CancelScope() for name in ("lead", "a", "b", "c")}

    async def one(name: str) -> None:
        with scopes[name]:
            outcomes[name] = await enqueuer.enqueue(NewJob(kind="work", unique_key=name))
            return
        outcomes[name] = "cancelled"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "lead")
        await gated.entered.wait()
        for name in ("a", "b", "c"):
            nursery.start_soon(one, name)
        await trio.testing.wait_all_tasks_blocked()
        first = enqueuer._waiting[0].row.unique_key
        scopes[first].cancel()
        gated.gate.set()
    rest = [n for n in ("a", "b", "c") if n != first]
    assert all(outcomes[n].created for n in ["lead", *rest])
    written = sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE unique_key = $1", first)
    assert outcomes[first] == "cancelled" and written == 0
