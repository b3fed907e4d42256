"""The step writer against the real store: steps of many running workflows share
statements, each `await ctx.step(...)` returns once its result is committed, and a step
whose row fails (a lost lease, a value Postgres refuses, an outage) fails in its own
workflow only."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import msgspec
import trio
import trio.testing

from actors.ports import LeaseLost, NewJob, StepRow, StoreUnavailable, ValueRejected
from actors.services.step_writer import StepWriter
from actors.workflow_context import Workflow


class Counting:
    """The store, counting save_steps statements and their sizes; `fail` makes the
    statements numbered in it raise instead. With `hold`, the first statement waits at
    `gate` (once the test opens it, every later one goes straight through)."""

    def __init__(self, store: Any, fail: dict[int, Exception] | None = None,
                 hold: bool = False):
        self.store = store
        self.sizes: list[int] = []
        self.payloads: list[list[int]] = []  # per statement, each row's size as bounded
        self.fail = fail or {}
        self.entered = trio.Event()
        self.gate = trio.Event()
        if not hold:
            self.gate.set()

    async def save_steps(self, rows: list[StepRow]) -> list[str | None]:
        self.sizes.append(len(rows))
        self.payloads.append([len(r.result) + len(r.name) for r in rows])
        if len(self.sizes) == 1:
            self.entered.set()
            await self.gate.wait()
        if (exc := self.fail.get(len(self.sizes))) is not None:
            raise exc
        out: list[str | None] = await self.store.save_steps(rows)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def running(store: Any, n: int) -> list[Any]:
    await store.enqueue_many([NewJob(kind="wf") for _ in range(n)])
    claimed = await store.claim("default", n, "d1", 30.0, ["wf"])
    assert len(claimed) == n
    return sorted(claimed, key=lambda c: c.id)


def workflow(claimed: Any, writer: StepWriter, token: int | None = None) -> Workflow:
    job = SimpleNamespace(id=claimed.id, key=None)
    return Workflow(lambda: job, claimed.lease_token if token is None else token, writer,
                    claimed_steps="[]")


async def test_an_idle_step_writes_at_once_alone(store, sql):
    [c] = await running(store, 1)
    counting = Counting(store)
    assert await workflow(c, StepWriter(counting)).step("a", lambda: 41 + 1) == 42
    assert counting.sizes == [1]
    assert sql.fetchval("SELECT result::text FROM jobd.job_steps WHERE job_id = $1", c.id) == "42"


async def test_steps_of_many_workflows_share_statements_and_return_when_durable(store, sql):
    claimed = await running(store, 40)
    counting = Counting(store)
    writer = StepWriter(counting)
    not_durable: list[tuple[int, str]] = []

    async def pipeline(c: Any) -> None:
        wf = workflow(c, writer)
        for name in ("fetch", "transform", "store"):
            assert await wf.step(name, lambda n=name: f"{n}:{c.id}") == f"{name}:{c.id}"
            # Another connection sees it: committed before the await returned.
            if sql.fetchval("SELECT count(*) FROM jobd.job_steps WHERE job_id = $1"
                            " AND name = $2 AND finished_at IS NOT NULL", c.id, name) != 1:
                not_durable.append((c.id, name))

    async with trio.open_nursery() as nursery:
        for c in claimed:
            nursery.start_soon(pipeline, c)
    assert not_durable == []
    assert sum(counting.sizes) == 120
    assert len(counting.sizes) <= 12, counting.sizes  # 120 steps, a handful of statements
    assert writer.commit.writes == len(counting.sizes)
    assert sql.fetchval("SELECT count(*) FROM jobd.job_steps") == 120


async def outcomes_of(counting: Counting, flows: list[tuple[Workflow, Any]]) -> list[Any]:
    """Each workflow runs one step: the first holds the write (`counting` made with
    hold=True) while the others arrive. Each its result or the exception it raised."""
    out: list[Any] = [None] * len(flows)

    async def one(i: int, wf: Workflow, fn: Any) -> None:
        try:
            out[i] = await wf.step("s", fn)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            out[i] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, 0, *flows[0])
        await counting.entered.wait()
        for i, (wf, fn) in enumerate(flows[1:], 1):
            nursery.start_soon(one, i, wf, fn)
        await trio.testing.wait_all_tasks_blocked()
        counting.gate.set()
    return out


async def test_a_failing_row_fails_only_its_own_workflows_step(store, sql):
    claimed = await running(store, 6)
    counting = Counting(store, hold=True)
    writer = StepWriter(counting)
    flows = [(workflow(c, writer), lambda i=i: i) for i, c in enumerate(claimed)]
    flows[2] = (workflow(claimed[2], writer), lambda: "nul \x00 byte")  # jsonb refuses it
    flows[4] = (workflow(claimed[4], writer, token=claimed[4].lease_token + 1), lambda: 4)
    out = await outcomes_of(counting, flows)
    assert isinstance(out[2], ValueRejected), out
    assert isinstance(out[4], LeaseLost), out
    assert [out[i] for i in (0, 1, 3, 5)] == [0, 1, 3, 5]
    # The first alone, the other five together, refused, then row by row.
    assert counting.sizes == [1, 5, 1, 1, 1, 1, 1], counting.sizes
    stored = {r["job_id"] for r in sql.fetch("SELECT job_id FROM jobd.job_steps")}
    assert stored == {claimed[i].id for i in (0, 1, 3, 5)}
    # The failed step is not memoized: the workflow may run it again.
    wf2 = flows[2][0]
    assert await wf2.step("s", lambda: "fine now") == "fine now"


async def test_an_outage_fails_that_statements_steps_and_the_next_goes(store, sql):
    claimed = await running(store, 3)
    counting = Counting(store, fail={2: StoreUnavailable("database unavailable")}, hold=True)
    writer = StepWriter(counting)
    out = await outcomes_of(counting, [(workflow(c, writer), lambda: 1) for c in claimed])
    assert out[0] == 1 and all(isinstance(e, StoreUnavailable) for e in out[1:])
    assert out[1] is not out[2]
    assert await workflow(claimed[1], writer).step("s", lambda: 2) == 2
    assert sql.fetchval("SELECT count(*) FROM jobd.job_steps") == 2


async def test_a_cancelled_waiting_step_is_not_written(store, sql):
    claimed = await running(store, 2)
    counting = Counting(store, hold=True)
    writer = StepWriter(counting)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(workflow(claimed[0], writer).step, "s", lambda: 1)
        await counting.entered.wait()
        with trio.CancelScope() as scope:
            nursery.start_soon(_cancel_soon, scope)
            await workflow(claimed[1], writer).step("s", lambda: 2)
        assert scope.cancelled_caught
        counting.gate.set()
    assert counting.sizes == [1]
    assert [r["job_id"] for r in sql.fetch("SELECT job_id FROM jobd.job_steps")] == [claimed[0].id]


async def _cancel_soon(scope: trio.CancelScope) -> None:
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()


async def test_a_statement_holds_at_most_max_bytes_of_results(store, sql):
    """Big results do not pile up in one statement: a row that would pass the bound
    starts the next one, and a row over it alone goes alone."""
    claimed = await running(store, 5)
    counting = Counting(store, hold=True)
    writer = StepWriter(counting, max_bytes=100)
    big = '"' + "x" * 40 + '"'
    results = [big, big, big, '"' + "y" * 200 + '"', big]
    flows = [(workflow(c, writer), lambda r=r: msgspec.json.decode(r))
             for c, r in zip(claimed, results, strict=True)]
    out = await outcomes_of(counting, flows)
    assert out == [msgspec.json.decode(r) for r in results]
    # Which rows share a statement depends on the order the workflows reach the writer;
    # the bound does not: no statement of several rows passes it, the big row goes alone.
    assert sum(counting.sizes) == 5 and len(counting.sizes) >= 3, counting.payloads
    for payload in counting.payloads:
        assert len(payload) == 1 or sum(payload) <= 100, counting.payloads
    assert [len(p) for p in counting.payloads if max(p) > 100] == [1], counting.payloads
    assert sql.fetchval("SELECT count(*) FROM jobd.job_steps") == 5
