"""actors/workflow.py through AttemptRunner, on an in-memory StepStore (no Postgres)."""

from __future__ import annotations

import random
import time
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
import trio

from actors.handlers import HANDLERS, job
from actors.ports import Claimed
from actors.runtime.clock import TrioClock
from actors.services.worker import Attempt, AttemptRunner
from actors.workflow import Child, Suspend


class HTTPError(Exception):
    def __init__(self, status: int, retry_after: str | None = None):
        super().__init__(f"HTTP {status}")
        self.status_code = status
        self.headers = {"retry-after": retry_after} if retry_after else {}


class MemoryStore:
    """The StepStore contract in a dict; counts round trips."""

    def __init__(self) -> None:
        self.steps: dict[tuple[int, str], dict[str, Any]] = {}
        self.jobs: dict[int, dict[str, Any]] = {}
        self.trips = 0
        self.next_id = 1000

    async def load_steps(self, job_id):
        self.trips += 1
        return [(n, s["result"], s["done"]) for (j, n), s in self.steps.items() if j == job_id]

    async def save_step(self, job_id, token, name, result, attempts, duration_s):
        self.trips += 1
        s = self.steps.setdefault((job_id, name), {"result": None, "done": False, "attempts": 0})
        s["attempts"] += attempts
        if not s["done"]:
            s.update(result=result, done=True)
        return s["result"]

    async def save_step_error(self, job_id, name, error, attempts):
        self.trips += 1
        s = self.steps.setdefault((job_id, name), {"result": None, "done": False, "attempts": 0})
        s["attempts"] += attempts
        s["error"] = error

    async def begin_sleep(self, job_id, name, until):
        self.trips += 1
        s = self.steps.setdefault((job_id, name), {"result": msgspec.json.encode(
            {"until": until}).decode(), "done": True, "attempts": 1})
        return msgspec.json.decode(s["result"])["until"]

    async def spawn_children(self, job_id, name, jobs):
        self.trips += 1
        if (job_id, name) not in self.steps:
            ids = []
            for j in jobs:
                self.next_id += 1
                self.jobs[self.next_id] = {"id": self.next_id, "kind": j.kind, "state": "available",
                                           "result": None, "error": None, "args": j.args}
                ids.append(self.next_id)
            self.steps[(job_id, name)] = {"result": msgspec.json.encode(ids).decode(),
                                          "done": True, "attempts": 1}
        return msgspec.json.decode(self.steps[(job_id, name)]["result"])

    async def gather_children(self, job_id, token, waiting_on, ids):
        self.trips += 1
        return [self.jobs[i] for i in ids if i in self.jobs]

    async def begin_wait(self, job_id, token, step, event, match, timeout_s):
        self.trips += 1
        now = time.time()
        s = self.steps.setdefault((job_id, step), {"result": msgspec.json.encode(
            {"since": now, "deadline": None if timeout_s is None else now + timeout_s}).decode(),
            "done": False, "attempts": 1})
        return s["result"], self.jobs.get(-1, {}).get(event), now

    async def get_job(self, job_id):
        return None


class Harness:
    def __init__(self) -> None:
        self.store = MemoryStore()
        self.runner = AttemptRunner(
            handlers=HANDLERS, clock=TrioClock(), report_progress=lambda *a: None, transaction=self._tx,
            default_timeout_s=None, progress_every_items=1, progress_every_s=60.0,
            snooze_burns_attempt=False, rng=random.Random(1), steps=self.store)

    @asynccontextmanager
    async def _tx(self):
        yield None

    async def run(self, kind: str, args: dict | None = None, attempt: int = 1,
                  key: str | None = None, claimed_steps: str | None = None):
        at = datetime(2024, 1, 1, tzinfo=UTC)
        claimed = Claimed(id=7, queue="default", kind=kind,
                          args=msgspec.json.encode(args or {}).decode(), key=key, priority=0,
                          attempt=attempt, max_attempts=5, lease_token=1, timeout_s=None,
                          tags=[], errors="[]", unique_key=None, run_at=at, created_at=at,
                          started_at=at, steps=claimed_steps)
        outcome, label, _ = await self.runner.run(Attempt(claimed))
        self.record(claimed.id, outcome)
        return outcome, label

    def record(self, job_id: int, outcome) -> None:
        """What FINISH_MANY stores of a suspension: the sleeps and waits the run began."""
        for row in msgspec.json.decode(outcome.steps or "[]"):
            if row.get("wait"):
                now = time.time()
                timeout = row["timeout_s"]
                result = {"since": now, "deadline": None if timeout is None else now + timeout}
                done = False
            else:
                result, done = {"until": row["until"]}, True
            self.store.steps.setdefault((job_id, row["name"]), {
                "result": msgspec.json.encode(result).decode(), "done": done, "attempts": 1})
        self.store.waiting_on = outcome.waiting_on


CALLS: list[str] = []


class Empty(msgspec.Struct):
    pass


@job("t.wf.steps", max_attempts=5)
async def steps_handler(ctx, args: Empty) -> dict:
    a = await ctx.step("a", lambda: CALLS.append("a") or {"x": (1, 2)})
    b = await ctx.step("b", _async_b, 3)
    if len(CALLS) < 3:
        CALLS.append("boom")
        raise RuntimeError("crash after two steps")
    return {"a": a, "b": b}


async def _async_b(n: int) -> int:
    CALLS.append("b")
    return n * 2


async def test_completed_steps_do_not_run_again():
    CALLS.clear()
    h = Harness()
    outcome, _ = await h.run("t.wf.steps")
    assert outcome.state == "scheduled" and CALLS == ["a", "b", "boom"]
    outcome, _ = await h.run("t.wf.steps", attempt=2)
    assert outcome.state == "completed"
    assert CALLS == ["a", "b", "boom"]  # nothing re-ran
    # Tuples come back as lists on every run, the first included (decoded from storage).
    assert msgspec.json.decode(outcome.result) == {"a": {"x": [1, 2]}, "b": 6}


FLAKY: list[int] = []


@job("t.wf.retry")
async def retry_handler(ctx, args: Empty) -> int:
    def call() -> int:
        FLAKY.append(1)
        if len(FLAKY) == 1:
            raise HTTPError(429, retry_after="0.01")
        if len(FLAKY) == 2:
            raise HTTPError(503)
        return len(FLAKY)

    return await ctx.step("call", call, backoff_s=0.01)


async def test_step_retries_in_place_honouring_retry_after():
    FLAKY.clear()
    h = Harness()
    outcome, _ = await h.run("t.wf.retry")
    assert outcome.state == "completed" and outcome.result == "3"
    assert h.store.steps[(7, "call")]["attempts"] == 3


async def test_a_keyed_steps_rate_limit_reaches_the_keys_limiter():
    # (issue 14, item 8) Retried in place, the 429 would never pause the key: every other
    # job of the key would go on hitting the site. It ends the run as the job's own
    # rate-limit outcome instead; the finished steps are kept for the next run.
    FLAKY.clear()
    h = Harness()
    outcome, label = await h.run("t.wf.retry", key="ebay")
    assert len(FLAKY) == 1 and label == "error"
    assert (outcome.state, outcome.flow, outcome.pause_s) == ("scheduled", "rate_limited", 0.01)
    assert "rate_limit" in h.store.steps[(7, "call")]["error"]


@job("t.wf.limited")
async def limited_handler(ctx, args: Empty) -> None:
    from actors import RateLimited

    async def call() -> None:
        FLAKY.append(1)
        raise RateLimited()

    await ctx.step("call", call)


async def test_rate_limited_without_seconds_leaves_the_pause_to_the_queue():
    FLAKY.clear()
    h = Harness()
    outcome, _ = await h.run("t.wf.limited", key="ebay")
    assert len(FLAKY) == 1
    assert (outcome.flow, outcome.pause_s) == ("rate_limited", None)
    assert outcome.state == "scheduled" and outcome.delay_s > 30  # the job's own backoff


@job("t.wf.fatal")
async def fatal_handler(ctx, args: Empty) -> None:
    def call() -> None:
        FLAKY.append(1)
        raise HTTPError(401)

    await ctx.step("call", call)


async def test_non_retryable_step_error_fails_the_job_at_once():
    FLAKY.clear()
    h = Harness()
    outcome, _ = await h.run("t.wf.fatal")
    assert outcome.state == "failed" and len(FLAKY) == 1
    assert "client" in h.store.steps[(7, "call")]["error"]


@job("t.wf.sleep")
async def sleep_handler(ctx, args: Empty) -> str:
    await ctx.sleep("nap", "1h")
    return "awake"


async def test_sleep_suspends_without_burning_an_attempt():
    h = Harness()
    outcome, label = await h.run("t.wf.sleep")
    assert label == "suspended" and outcome.state == "scheduled" and outcome.refund == 1
    assert 3590 < outcome.delay_s <= 3600
    # Once the time has passed, the sleep returns at once.
    h.store.steps[(7, "sleep:nap")]["result"] = '{"until": 1}'
    outcome, _ = await h.run("t.wf.sleep")
    assert outcome.state == "completed"


@job("t.wf.fanout")
async def fanout_handler(ctx, args: Empty) -> list:
    ids = await ctx.spawn_many([Child(kind="t.wf.sleep"), Child(kind="t.wf.sleep")], name="k")
    results = await ctx.gather(ids, name="k")
    return [r.result if r.ok else r.state for r in results]


async def test_gather_waits_then_returns_results_and_failures():
    h = Harness()
    outcome, _ = await h.run("t.wf.fanout")
    assert outcome.state == "waiting" and outcome.refund == 1
    a, b = sorted(h.store.jobs)
    h.store.jobs[a].update(state="completed", result='"ok"')
    h.store.jobs[b].update(state="failed", error='{"class": "fail"}')
    outcome, _ = await h.run("t.wf.fanout")
    assert msgspec.json.decode(outcome.result) == ["ok", "failed"]
    assert len(h.store.jobs) == 2  # the re-run spawned nothing new


@job("t.wf.parallel")
async def parallel_handler(ctx, args: Empty) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ctx.sleep, "a", 100)
        nursery.start_soon(ctx.sleep, "b", 50)


async def test_suspends_inside_a_nursery_end_the_run():
    h = Harness()
    outcome, _ = await h.run("t.wf.parallel")
    assert outcome.state == "scheduled" and outcome.delay_s <= 50


def test_suspend_is_not_an_exception():
    assert not issubclass(Suspend, Exception)


@job("t.wf.many")
async def many_handler(ctx, args: Empty) -> int:
    total = 0
    for i in range(1000):
        total += await ctx.step(f"s:{i}", lambda i=i: i)
    return total


@pytest.mark.parametrize("n", [1000])
async def test_memoized_step_overhead(n):
    """Prints µs per memoized step and round trips per replay (see README)."""
    h = Harness()
    await h.run("t.wf.many")
    h.store.trips = 0
    started = time.perf_counter()
    outcome, _ = await h.run("t.wf.many")
    elapsed = time.perf_counter() - started
    assert msgspec.json.decode(outcome.result) == sum(range(n))
    assert h.store.trips == 1  # one load for the whole replay
    print(f"memoized step: {elapsed / n * 1e6:.1f} us each, {h.store.trips} round trip for {n}")



async def test_a_suspension_costs_no_store_call():
    """A sleep, an event wait and a gather of children spawned in the same run suspend
    without a statement of their own: the finish records them (FINISH_MANY)."""
    h = Harness()
    outcome, _ = await h.run("t.wf.sleep")
    assert h.store.trips == 1  # the steps' load only
    [row] = msgspec.json.decode(outcome.steps)
    assert row["name"] == "sleep:nap" and abs(row["until"] - time.time() - 3600) < 5

    h = Harness()
    outcome, _ = await h.run("t.wf.event")
    assert h.store.trips == 1 and outcome.state == "waiting"
    assert msgspec.json.decode(outcome.steps) == [
        {"name": "event:approved", "wait": True, "timeout_s": 60.0}]
    assert msgspec.json.decode(outcome.waiting_on) == {
        "type": "event", "name": "approved", "match": {"id": 7}, "step": "event:approved",
        "timeout_s": 60.0}
    # Woken (by the event or the sweep), the re-run asks the store about the event.
    outcome, _ = await h.run("t.wf.event")
    assert outcome.state == "waiting" and outcome.steps == "[]" and h.store.trips == 3

    h = Harness()
    outcome, _ = await h.run("t.wf.fanout")
    assert h.store.trips == 2  # the steps' load and the spawn; no read of fresh children
    waiting = msgspec.json.decode(outcome.waiting_on)
    assert waiting["type"] == "children" and sorted(waiting["ids"]) == sorted(h.store.jobs)


@job("t.wf.event")
async def event_handler(ctx, args: Empty) -> object:
    return await ctx.wait_for_event("approved", match={"id": 7}, timeout=60)


async def test_steps_that_come_with_the_claim_cost_no_load():
    CALLS.clear()
    h = Harness()
    outcome, _ = await h.run("t.wf.steps")
    assert outcome.steps == "[]"  # no sleep or wait to record; the job is marked
    h.store.trips = 0
    claimed = msgspec.json.encode([[n, msgspec.json.decode(s["result"]), s["done"]]
                                   for (_, n), s in h.store.steps.items()]).decode()
    outcome, _ = await h.run("t.wf.steps", attempt=2, claimed_steps=claimed)
    assert h.store.trips == 0 and CALLS == ["a", "b", "boom"]
    assert msgspec.json.decode(outcome.result) == {"a": {"x": [1, 2]}, "b": 6}


async def test_a_plain_job_is_not_marked():
    h = Harness()
    outcome, _ = await h.run("t.wf.plain")
    assert outcome.state == "completed" and outcome.steps is None


@job("t.wf.plain")
async def plain_handler(ctx, args: Empty) -> int:
    return 1


@job("t.wf.unsendable")
async def unsendable_handler(ctx, args: Empty) -> object:
    return await ctx.wait_for_event("needs approval", timeout=60)


async def test_a_wait_for_a_name_no_surface_can_send_fails_at_once():
    h = Harness()
    outcome, _ = await h.run("t.wf.unsendable")
    assert outcome.state == "failed" and "not an event name that can be sent" in outcome.error
