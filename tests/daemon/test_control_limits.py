"""The control actor's edge checks against a real store: rows built from declarations,
key functions and Python-made specs meet the same limits as decoded commands; args over
limits.max_args_bytes are too_large; enqueues to unserved queues warn, pauses of unknown
queues are refused; list pages leave large fields out and `get` shows them whole."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import trio

from actors import jobs
from actors.context import Context
from actors.handlers import HANDLERS, Handlers, job
from actors.ports import NewJob
from actors.services import live_queues as live_queues_module
from actors.services.control import Control
from protocol import commands as c
from protocol.errors import ErrorCode, JobdError
from protocol.jobs import JobSpec
from protocol.tree import TreeNode


class SleepArgs(msgspec.Struct):
    seconds: float = 1.0
    note: str = ""


@pytest.fixture(autouse=True)
def registry(empty_handlers) -> Iterator[Handlers]:
    """The kinds below, in an emptied HANDLERS put back after each test."""

    @job("sleep")
    async def sleep(ctx: Context, args: SleepArgs) -> None:
        return None

    @job("keyed", key=lambda a: a.note)
    async def keyed(ctx: Context, args: SleepArgs) -> None:
        return None

    @job("badkey", key=lambda a: 1 / 0)
    async def badkey(ctx: Context, args: SleepArgs) -> None:
        return None

    @job("forever", timeout=1e308)
    async def forever(ctx: Context, args: SleepArgs) -> None:
        return None

    yield HANDLERS


def new_job(spec: JobSpec, *, max_args_bytes: int | None = None) -> NewJob:
    return jobs.from_spec(HANDLERS, spec, max_args_bytes=max_args_bytes)


def control(store: Any, **options: Any) -> Control:
    async def nothing(*_: Any) -> None:
        return None

    return Control(store, handlers=HANDLERS, server="test", pong=lambda: None, tree=lambda: TreeNode(
        name="root", kind="supervisor", state="running"), running_here=dict,
        cancel_here=nothing, queues=lambda: {"default"}, **options)


def refused(spec: JobSpec, **options: Any) -> JobdError:
    with pytest.raises(JobdError) as info:
        new_job(spec, **options)
    return info.value


# --------------------------------------------------------------------------- rows


@pytest.mark.parametrize(("spec", "field"), [
    (JobSpec(kind="sleep", timeout_s=math.inf), "timeout_s"),
    (JobSpec(kind="sleep", timeout_s=math.nan), "timeout_s"),
    (JobSpec(kind="sleep", delay_s=math.nan), "delay_s"),
    (JobSpec(kind="sleep", delay_s=1e16), "delay_s"),
    (JobSpec(kind="sleep", priority=2**20), "priority"),
    (JobSpec(kind="sleep", max_attempts=10**9), "max_attempts"),
    (JobSpec(kind="sleep", cost=2**40), "cost"),
    (JobSpec(kind="sleep", key="k" * 600), "key"),
    (JobSpec(kind="sleep", key="a\x00"), "key"),
    (JobSpec(kind="sleep", queue="q\x00"), "queue"),
    (JobSpec(kind="sleep", unique_key="u" * 3000), "unique_key"),
    (JobSpec(kind="sleep", tags=["t"] * 101), "tags"),
    (JobSpec(kind="sleep", tags=["ok", "t\x00"]), "tags[1]"),
    (JobSpec(kind="keyed", args={"note": "n" * 3000}), "key"),  # computed by the handler
    (JobSpec(kind="forever"), "timeout_s"),  # the handler's own declaration
])
def test_a_row_out_of_range_is_bad_request_naming_the_field(spec: JobSpec, field: str):
    # Specs made in Python (ctx.enqueue, jobctl) are not range-checked by msgspec.
    error = refused(spec)
    assert error.code == ErrorCode.BAD_REQUEST
    assert error.details["field"] == field and error.message.startswith(f"{field}: ")


def test_run_at_may_lie_at_most_ten_years_ahead():
    from datetime import UTC, datetime

    error = refused(JobSpec(kind="sleep", run_at=datetime(9999, 1, 1, tzinfo=UTC)))
    assert error.code == ErrorCode.BAD_REQUEST and error.details["field"] == "run_at"
    assert new_job(JobSpec(kind="sleep", run_at=datetime(1, 1, 1))).delay_s == 0.0


def test_args_over_the_limit_are_too_large_with_the_limit_in_the_message():
    error = refused(JobSpec(kind="sleep", args={"note": "x" * 5000}), max_args_bytes=4096)
    assert error.code == ErrorCode.TOO_LARGE
    assert "4096" in error.message and "limits.max_args_bytes" in error.message
    assert error.details == {"field": "args", "bytes": 5025, "limit": 4096}
    assert new_job(JobSpec(kind="sleep", args={"note": "x" * 4000}), max_args_bytes=4096)


def test_args_holding_a_nul_are_invalid_args():
    error = refused(JobSpec(kind="sleep", args={"note": "<html>\x00"}))
    assert error.code == ErrorCode.INVALID_ARGS and "NUL" in error.message
    # A backslash followed by "u0000" is just text.
    assert new_job(JobSpec(kind="sleep", args={"note": "\\u0000"}))


def test_a_failing_key_function_is_invalid_args():
    error = refused(JobSpec(kind="badkey"))
    assert error.code == ErrorCode.INVALID_ARGS and "ZeroDivisionError" in error.message


# --------------------------------------------------------------------------- commands


async def test_enqueue_reports_the_limit_and_batch_index(store):
    ctl = control(store, max_args_bytes=2048)
    with pytest.raises(JobdError) as info:
        await ctl.handle(c.Enqueue(job=JobSpec(kind="sleep", args={"note": "x" * 3000})))
    assert info.value.code == ErrorCode.TOO_LARGE and "2048" in info.value.message
    with pytest.raises(JobdError) as info:
        await ctl.handle(c.EnqueueBatch(jobs=[JobSpec(kind="sleep"),
                                              JobSpec(kind="sleep", timeout_s=-1.0)]))
    assert info.value.code == ErrorCode.BAD_REQUEST and info.value.details["index"] == 1
    with pytest.raises(JobdError) as info:
        await ctl.handle(c.SendEvent(name="e", data={"blob": "x" * 3000}))
    assert info.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(JobdError) as info:
        await ctl.handle(c.SendEvent(name="e", data={"blob": "\x00"}))
    assert info.value.code == ErrorCode.BAD_REQUEST


async def test_an_enqueue_to_a_queue_no_live_daemon_serves_says_so(store, monkeypatch):
    monkeypatch.setattr(live_queues_module, "MISSING_QUEUE_TTL_S", 0.2)
    ctl = control(store)
    here = await ctl.handle(c.Enqueue(job=JobSpec(kind="sleep")))
    assert here.warning is None
    typo = await ctl.handle(c.Enqueue(job=JobSpec(kind="sleep", queue="nosuchqueue")))
    assert typo.created and typo.warning is not None
    assert "no live daemon serves queue 'nosuchqueue'" in typo.warning
    assert "default" in typo.warning  # what is served, for the typo
    batch = await ctl.handle(c.EnqueueBatch(jobs=[JobSpec(kind="sleep", queue="crawl")]))
    assert "'crawl'" in batch.warning
    await store.register_daemon("other", "r", "h", 1, "v")
    await store.set_daemon_queues("other", ["crawl"])
    await trio.sleep(0.3)  # a miss is kept that long (a second by default)
    served = await ctl.handle(c.Enqueue(job=JobSpec(kind="sleep", queue="crawl")))
    assert served.warning is None


async def test_pausing_a_queue_nothing_serves_is_refused(store):
    ctl = control(store)
    with pytest.raises(JobdError) as info:
        await ctl.handle(c.Pause(queue="nosuchqueue"))
    assert info.value.code == ErrorCode.NOT_FOUND and "default" in info.value.message
    assert await store.list_pauses() == []
    assert (await ctl.handle(c.Pause(queue="default"))).paused
    await store.register_daemon("other", "r", "h", 1, "v")
    await store.set_daemon_queues("other", ["crawl"])
    assert (await ctl.handle(c.Pause(queue="crawl", key="ebay"))).paused
    # Resume is never refused: it undoes whatever is there.
    assert not (await ctl.handle(c.Resume(queue="nosuchqueue"))).paused


async def test_list_leaves_large_fields_out_and_get_shows_them(store, sql):
    ctl = control(store, list_field_bytes=1024)
    done = await ctl.handle(c.Enqueue(job=JobSpec(kind="sleep", args={"note": "x" * 2000})))
    sql.execute("UPDATE jobd.jobs SET result = $1::jsonb WHERE id = $2",
                msgspec.json.encode({"page": "r" * 100_000}).decode(), done.id)
    small = await ctl.handle(c.Enqueue(job=JobSpec(kind="sleep")))
    page = await ctl.handle(c.List())
    big_view, small_view = ({v.id: v for v in page.jobs}[i] for i in (done.id, small.id))
    assert big_view.args is None and big_view.result is None
    assert big_view.truncated == ["args", "result"]
    assert small_view.args == {"seconds": 1.0, "note": ""} and small_view.truncated == []
    whole = await ctl.handle(c.Get(job_id=done.id))
    assert whole.args["note"] == "x" * 2000 and len(whole.result["page"]) == 100_000
    assert whole.truncated == []


async def test_watch_frames_leave_large_fields_out(store, sql):
    ctl = control(store, list_field_bytes=1024)
    done = await ctl.handle(c.Enqueue(job=JobSpec(kind="sleep")))
    sql.execute("UPDATE jobd.jobs SET state = 'completed', finished_at = now(), "
                "result = $1::jsonb, progress_note = $2 WHERE id = $3",
                msgspec.json.encode({"page": "r" * 100_000}).decode(), "é" * 600, done.id)
    frames = [view async for view in ctl.watch(c.Watch(job_id=done.id))]
    [frame] = frames
    assert frame.state == "completed" and frame.result is None
    assert frame.truncated == ["result", "progress_note"] and frame.progress_note == "é" * 256
    assert frame.args == {"seconds": 1.0, "note": ""}
    with pytest.raises(JobdError) as info:
        [view async for view in ctl.watch(c.Watch(job_id=done.id + 100))]
    assert info.value.code == ErrorCode.NOT_FOUND


@pytest.mark.parametrize(("schedule", "words"), [
    ({"every": "99999999d"}, "`every` must be at most"),
    ({"every": "1m", "grace": "99999999d"}, "`grace` must be at most"),
    ({"every": "1m", "jitter": "99999999d"}, "`jitter` must be at most"),
    ({"every": "1m", "args": {"note": "\x00"}}, "NUL"),
])
async def test_schedule_values_the_scheduler_cannot_use_are_refused(store, schedule, words):
    from protocol.schedules import ScheduleSpec

    spec = msgspec.convert({"name": "s", "kind": "sleep", **schedule}, ScheduleSpec)
    with pytest.raises(JobdError) as info:
        await control(store).handle(c.ScheduleAdd(schedule=spec))
    assert info.value.code == ErrorCode.BAD_REQUEST and words in info.value.message
    assert (await store.list_schedules())[1] == []


async def test_errors_written_by_hand_in_another_shape_still_show(store, sql):
    ctl = control(store)
    done = await ctl.handle(c.Enqueue(job=JobSpec(kind="sleep")))
    sql.execute("""UPDATE jobd.jobs SET errors = '[1, {"x": 2}]' WHERE id = $1""", done.id)
    [error] = (await ctl.handle(c.Get(job_id=done.id))).errors
    assert error.error_class == "unknown" and '{"x": 2}' in error.message
    assert (await ctl.handle(c.List())).jobs[0].errors == [error]


def test_rows_built_inside_actors_meet_the_configured_args_limit(monkeypatch):
    from actors import validate
    from actors.schedule_jobs import definition
    from actors.workflow import Child
    from protocol.schedules import ScheduleSpec

    monkeypatch.setattr(validate, "_max_args_bytes", validate.DEFAULT_MAX_ARGS_BYTES)
    validate.configure(2048)
    big = {"note": "x" * 3000}
    assert refused(JobSpec(kind="sleep", args=big)).code == ErrorCode.TOO_LARGE  # ctx.enqueue
    with pytest.raises(JobdError) as info:  # ctx.spawn
        jobs.child(HANDLERS, Child(kind="sleep", args=big), parent=None)
    assert info.value.code == ErrorCode.TOO_LARGE and "2048" in info.value.message
    with pytest.raises(ValueError, match="2048"):
        definition(HANDLERS, ScheduleSpec(name="s", kind="sleep", every="1m", args=big))
    validate.configure(8192)
    assert new_job(JobSpec(kind="sleep", args=big))


async def test_queues_served_elsewhere_are_not_asked_per_enqueue(store):
    calls = []
    live_queues = store.live_queues

    async def counting(live_s: float) -> list[str]:
        calls.append(live_s)
        return await live_queues(live_s)

    store.live_queues = counting
    await store.register_daemon("other", "r", "h", 1, "v")
    await store.set_daemon_queues("other", ["crawl"])
    ctl = control(store)
    for _ in range(5):
        done = await ctl.handle(c.Enqueue(job=JobSpec(kind="sleep", queue="crawl")))
        assert done.warning is None
    assert len(calls) == 1
    typo = await ctl.handle(c.Enqueue(job=JobSpec(kind="sleep", queue="crawl2")))
    assert typo.warning is not None and len(calls) == 2  # a miss is always asked afresh


async def test_a_queue_nobody_serves_is_asked_once_a_second(store, monkeypatch):
    """A producer filling a queue before any daemon serves it pays a round trip per
    second, not per job; the warning still comes with every enqueue."""
    calls = []
    live_queues = store.live_queues

    async def counting(live_s: float) -> list[str]:
        calls.append(live_s)
        return await live_queues(live_s)

    store.live_queues = counting
    monkeypatch.setattr(live_queues_module, "MISSING_QUEUE_TTL_S", 0.2)
    ctl = control(store)
    for _ in range(5):
        done = await ctl.handle(c.Enqueue(job=JobSpec(kind="sleep", queue="later")))
        assert "no live daemon serves queue 'later'" in (done.warning or "")
    assert len(calls) == 1
    await trio.sleep(0.3)
    await ctl.handle(c.Enqueue(job=JobSpec(kind="sleep", queue="later")))
    assert len(calls) == 2
