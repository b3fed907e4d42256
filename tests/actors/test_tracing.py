"""Spans of attempts, steps, children and retries (actors/tracing.py), exported to memory
from the real attempt path: the dispatcher claims from a real store, the runner runs the
handler, outcomes are written with the store's finish, so retries, spawns, gathers and
resumptions happen as in the daemon.

The tree checked: the producer's traceparent is the parent of every attempt of its job;
a retry links to the failed attempt; steps that run are children of their attempt (a
memoized one has no span); a spawned child's attempts are children of the spawning
attempt, in the same trace; a handler's own spans (the ordinary OpenTelemetry API, an
async handler's and a sync handler's on its thread) nest under its attempt.
"""

from __future__ import annotations

import random
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors import jobs, tracing
from actors.handlers import HANDLERS, job
from actors.ports import NullObserver, Outcome
from actors.runtime.clock import TrioClock
from actors.runtime.mailbox import Mailbox
from actors.services.dispatcher import Dispatcher, QueueSettings
from actors.services.worker import AttemptRunner
from actors.workflow import Child
from daemon.config.sections import Tracing
from daemon.tracing import provider
from protocol.jobs import JobSpec

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"
PRODUCER = f"00-{TRACE_ID}-{SPAN_ID}-01"

EXPORTER = InMemorySpanExporter()
PROVIDER = provider(Tracing(enabled=True, sample_ratio=1.0), region="eu-test", daemon_id="d1",
                    processor=SimpleSpanProcessor(EXPORTER))
# The process-wide provider, as the daemon sets it: what a handler's trace.get_tracer reaches.
trace.set_tracer_provider(PROVIDER)
USER_TRACER = trace.get_tracer("user.handlers")


class Nothing(msgspec.Struct):
    pass


@pytest.fixture(autouse=True)
def traced(empty_handlers):
    EXPORTER.clear()
    tracing.install(PROVIDER.get_tracer("jobd"))

    @job("wf.parent", max_attempts=3, retry_delays={"unknown": 0.0})
    async def parent(ctx, args: Nothing) -> dict:
        a = await ctx.step("a", lambda: 1)
        if ctx.job.attempt == 1:
            raise RuntimeError("flaky, first time only")
        [child] = await ctx.spawn_many([Child(kind="wf.child", args={})], name="kids")
        done = await ctx.gather([child], name="kids")
        b = await ctx.step("b", lambda: 2)
        return {"a": a, "b": b, "child": done[0].result}

    @job("wf.child", max_attempts=1)
    async def child(ctx, args: Nothing) -> str:
        with USER_TRACER.start_as_current_span("user.work"):
            with tracing.span("http.call", {"http.url": "http://127.0.0.1/x", "none": None}):
                await trio.sleep(0.001)
        return "kid"

    @job("sync.kind", max_attempts=1)
    def sync_kind(ctx, args: Nothing) -> str:
        with USER_TRACER.start_as_current_span("user.thread_work"):
            return "ok"

    @job("enqueuer", max_attempts=1)
    async def enqueuer(ctx, args: Nothing) -> int:
        [done] = await ctx.enqueue_batch([JobSpec(kind="sync.kind")])
        return done.id

    yield
    tracing.install(None)


@asynccontextmanager
async def daemon_like(store):
    """The attempt path of the daemon on one queue, with outcomes written at once."""
    runner = AttemptRunner(
        handlers=HANDLERS, clock=TrioClock(), report_progress=lambda *a: None,
        transaction=store.transaction, default_timeout_s=None, progress_every_items=10,
        progress_every_s=10.0, snooze_burns_attempt=False, rng=random.Random(1),
        steps=store, enqueue_children=store.enqueue_children)

    async def finish(outcome: Outcome) -> None:
        await store.finish_many([outcome])

    def finish_nowait(outcome: Outcome) -> None:
        raise trio.WouldBlock

    d = Dispatcher(
        Mailbox("pool:default", capacity=100),
        QueueSettings(queue="default", concurrency=4, claim_batch=10, lease_s=30.0,
                      poll_interval_s=0.05),
        daemon_id="d1", store=store, runner=runner, finish=finish, finish_nowait=finish_nowait,
        kinds=HANDLERS.kinds, paused=lambda queue: (False, []), observer=NullObserver(),
        clock=TrioClock())
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        yield
        nursery.cancel_scope.cancel()


async def finished(store, job_id: int, timeout: float = 20.0) -> dict:
    with trio.fail_after(timeout):
        while True:
            row = await store.get_job(job_id)
            if row["state"] in ("completed", "failed", "cancelled"):
                return row
            await trio.sleep(0.02)


def spans_named(name: str) -> list:
    return [s for s in EXPORTER.get_finished_spans() if s.name == name]


def attempts_of(job_id: int) -> list:
    return sorted((s for s in spans_named(tracing.ATTEMPT_SPAN)
                   if s.attributes["jobd.job_id"] == job_id), key=lambda s: s.start_time)


def hex_ids(span) -> tuple[str, str]:
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


async def test_a_workflow_with_steps_a_child_and_a_retry_makes_one_tree(store):
    [parent] = await store.enqueue_many([jobs.from_spec(HANDLERS, JobSpec(
        kind="wf.parent", traceparent=PRODUCER))])
    async with daemon_like(store):
        row = await finished(store, parent.id)
    assert row["state"] == "completed", row["errors"]

    runs = attempts_of(parent.id)
    # Attempt 1 fails and retries; attempt 2 spawns and suspends on the gather; the
    # resumed run completes (a suspension does not count an attempt).
    assert [s.attributes["jobd.outcome"] for s in runs] == ["retried", "suspended", "completed"]
    assert [s.attributes["jobd.attempt"] for s in runs] == [1, 2, 2]
    for run in runs:  # every attempt's parent is the producer's span, in its trace
        assert run.parent is not None and run.parent.is_remote
        assert f"{run.parent.trace_id:032x}" == TRACE_ID
        assert f"{run.parent.span_id:016x}" == SPAN_ID
        assert run.kind == trace.SpanKind.CONSUMER
        assert run.attributes["jobd.kind"] == "wf.parent"
        assert run.attributes["jobd.queue"] == "default"
        assert run.attributes["jobd.wait_ms"] >= 0
        assert "jobd.key" not in run.attributes  # no key, no attribute (never a None)
    first, second, third = runs
    assert first.attributes["jobd.error_class"] == "unknown"
    assert first.status.status_code == trace.StatusCode.ERROR
    assert "jobd.error_class" not in third.attributes
    # The retry links to the attempt whose failure caused it (its stored error names it).
    assert [link.context.span_id for link in second.links] == [first.context.span_id]
    assert [link.context.span_id for link in third.links] == [first.context.span_id]
    assert not first.links
    errors = msgspec.json.decode(row["errors"])
    assert (errors[0]["trace_id"], errors[0]["span_id"]) == hex_ids(first)

    steps = spans_named(tracing.STEP_SPAN)
    by_step = {s.attributes["jobd.step"]: s for s in steps}
    # "a" ran once (in attempt 1), was memoized later: one span; "b" ran in the last run.
    assert sorted(s.attributes["jobd.step"] for s in steps) == ["a", "b"]
    assert by_step["a"].parent.span_id == first.context.span_id
    assert by_step["b"].parent.span_id == third.context.span_id
    assert by_step["a"].attributes["jobd.step.tries"] == 1

    [child_id] = {s.attributes["jobd.job_id"] for s in spans_named(tracing.ATTEMPT_SPAN)} - {
        parent.id}
    [kid] = attempts_of(child_id)
    # The child's attempt is a child of the attempt that spawned it, in the same trace.
    assert kid.parent.span_id == second.context.span_id
    assert f"{kid.context.trace_id:032x}" == TRACE_ID
    assert kid.attributes["jobd.outcome"] == "completed"
    [work] = spans_named("user.work")
    [call] = spans_named("http.call")
    assert work.parent.span_id == kid.context.span_id
    assert call.parent.span_id == work.context.span_id
    assert dict(call.attributes) == {"http.url": "http://127.0.0.1/x"}
    # The resource names the service and the region.
    assert first.resource.attributes["service.name"] == "jobd"
    assert first.resource.attributes["jobd.region"] == "eu-test"


async def test_a_sync_handlers_spans_nest_under_its_attempt_on_its_thread(store):
    [enq] = await store.enqueue_many([jobs.from_spec(HANDLERS, JobSpec(kind="enqueuer"))])
    async with daemon_like(store):
        row = await finished(store, enq.id)
        child_id = int(row["result"])
        await finished(store, child_id)
    [outer] = attempts_of(enq.id)
    assert outer.parent is None  # no producer context: the attempt starts its own trace
    [inner] = attempts_of(child_id)
    # ctx.enqueue from inside an attempt: the enqueued job's parent is that attempt.
    assert inner.parent.span_id == outer.context.span_id
    [work] = spans_named("user.thread_work")
    assert work.parent.span_id == inner.context.span_id
    stored = await store.get_job(child_id)
    assert stored is not None


async def test_off_nothing_is_built_and_a_stored_traceparent_waits(store):
    tracing.install(None)
    assert tracing.start_attempt is not None and not tracing.active()
    assert tracing.current_traceparent() is None
    with tracing.span("http.call", {"a": 1}) as span:
        assert span is None
    [a] = await store.enqueue_many([jobs.from_spec(HANDLERS, JobSpec(
        kind="wf.child", traceparent=PRODUCER))])
    async with daemon_like(store):
        row = await finished(store, a.id)
    assert row["state"] == "completed"
    # The handler's own API spans are the global provider's (still on in this process);
    # jobd's own are not built.
    assert not spans_named(tracing.ATTEMPT_SPAN) and not spans_named("http.call")
    claimed = await store._fetch("SELECT traceparent FROM jobd.jobs WHERE id = $1", a.id)
    assert claimed[0]["traceparent"] == PRODUCER


async def test_an_unsampled_producer_context_is_followed(store):
    unsampled = f"00-{TRACE_ID}-{SPAN_ID}-00"
    [a] = await store.enqueue_many([jobs.from_spec(HANDLERS, JobSpec(
        kind="wf.child", traceparent=unsampled))])
    async with daemon_like(store):
        await finished(store, a.id)
    assert not spans_named(tracing.ATTEMPT_SPAN)  # ParentBased: the producer said no


@pytest.mark.parametrize("where", ["__init__", "_end"])
async def test_a_bug_in_tracing_costs_the_attempt_nothing(store, monkeypatch, where):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in tracing")

    monkeypatch.setattr(tracing.AttemptSpan, where, broken)
    monkeypatch.setattr(tracing, "_logged", set())
    [a] = await store.enqueue_many([jobs.from_spec(HANDLERS, JobSpec(
        kind="wf.child", traceparent=PRODUCER))])
    [b] = await store.enqueue_many([jobs.from_spec(HANDLERS, JobSpec(kind="wf.child"))])
    async with daemon_like(store):
        for job_id in (a.id, b.id):
            row = await finished(store, job_id)
            assert (row["state"], row["result"]) == ("completed", '"kid"')
    assert tracing._logged == {"start" if where == "__init__" else "end"}
    # The attempt's context was put back: nothing of it is current after the attempts.
    assert tracing.current_traceparent() is None
