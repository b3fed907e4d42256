"""AttemptRunner: one attempt in its own cancel scope, turned into an Outcome.

No database: progress and transactions are fakes, time is trio's MockClock.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
import trio

from actors.context import Abandoned, Context
from actors.errors import Fail, RetryAfter
from actors.handlers import HANDLERS, job
from actors.ports import Claimed, Outcome
from actors.runtime.clock import TrioClock
from actors.services.worker import CANCEL_REQUESTED, SHUTDOWN, Attempt, AttemptRunner


class Args(msgspec.Struct):
    n: int = 0
    sleep_s: float = 0.0


class FakeTx:
    def __init__(self) -> None:
        self.finished: list[Outcome] = []
        self.executed: list[tuple[str, tuple[Any, ...]]] = []

    async def execute(self, sql: str, *args: Any) -> str:
        self.executed.append((sql, args))
        return "OK"

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return []

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return None

    async def finish(self, outcome: Outcome) -> bool:
        self.finished.append(outcome)
        return True


class Harness:
    def __init__(self, *, snooze_burns_attempt: bool = False,
                 default_timeout_s: float | None = None,
                 queue_timeout_s: Any = None, max_result_bytes: int | None = None) -> None:
        self.progress: list[tuple[int, int, float | None, str | None]] = []
        self.tx = FakeTx()
        self.runner = AttemptRunner(
            handlers=HANDLERS,
            clock=TrioClock(),
            report_progress=lambda *a: self.progress.append(a),
            transaction=self._transaction,
            default_timeout_s=default_timeout_s,
            progress_every_items=1,
            progress_every_s=60.0,
            snooze_burns_attempt=snooze_burns_attempt,
            rng=random.Random(7),
            queue_timeout_s=queue_timeout_s,
            max_result_bytes=max_result_bytes,
        )

    @asynccontextmanager
    async def _transaction(self):
        yield self.tx


def claimed(kind: str, args: dict[str, Any] | str | None = None, *, attempt: int = 1,
            max_attempts: int = 3, timeout_s: float | None = None) -> Claimed:
    at = datetime(2024, 1, 1, tzinfo=UTC)
    raw = args if isinstance(args, str) else msgspec.json.encode(args or {}).decode()
    return Claimed(id=11, queue="default", kind=kind, args=raw, key=None, priority=0,
                   attempt=attempt, max_attempts=max_attempts, lease_token=5,
                   timeout_s=timeout_s, tags=["a"], errors="[]", unique_key=None,
                   run_at=at, created_at=at, started_at=at)


def error_of(outcome: Outcome) -> dict[str, Any]:
    assert outcome.error is not None
    return msgspec.json.decode(outcome.error)


@pytest.fixture(autouse=True)
def kinds(empty_handlers) -> Iterator[None]:
    """The kinds each test uses, declared with @job into an emptied HANDLERS (put back
    after the test)."""

    @job("ok")
    async def ok(ctx: Context, args: Args) -> dict[str, Any]:
        ctx.progress(50, "half")
        return {"n": args.n, "attempt": ctx.job.attempt, "tags": ctx.job.tags}

    @job("boom")
    async def boom(ctx: Context, args: Args) -> None:
        raise RuntimeError("kaboom")

    @job("fatal")
    async def fatal(ctx: Context, args: Args) -> None:
        raise Fail("no way")

    @job("snooze")
    async def snooze(ctx: Context, args: Args) -> None:
        raise RetryAfter(args.sleep_s)

    @job("slow", timeout="5s")
    async def slow(ctx: Context, args: Args) -> str:
        await trio.sleep(args.sleep_s)
        return "done"

    @job("nap")
    async def nap(ctx: Context, args: Args) -> None:
        await trio.sleep(args.sleep_s)

    @job("unencodable")
    async def unencodable(ctx: Context, args: Args) -> object:
        return object()

    @job("in_tx")
    async def in_tx(ctx: Context, args: Args) -> None:
        async with ctx.transaction() as tx:
            await tx.execute("INSERT INTO t VALUES ($1)", args.n)
            await tx.complete({"n": args.n})
    yield


# --------------------------------------------------------------------------- outcomes


async def test_success_completes_with_the_json_result(autojump_clock):
    h = Harness()
    outcome, label, run_s = await h.runner.run(Attempt(claimed("ok", {"n": 3})))
    assert outcome == Outcome(id=11, token=5, state="completed",
                              result='{"n":3,"attempt":1,"tags":["a"]}', flow="ok")
    assert label == "completed"
    assert run_s == 0.0
    assert h.progress == [(11, 5, 50.0, "half")]


async def test_error_schedules_a_retry_with_backoff(autojump_clock):
    h = Harness()
    outcome, label, _ = await h.runner.run(Attempt(claimed("boom", attempt=1, max_attempts=3)))
    assert label == "error"
    assert (outcome.state, outcome.token, outcome.refund) == ("scheduled", 5, 0)
    assert outcome.delay_s is not None and 3.75 <= outcome.delay_s <= 6.25
    error = error_of(outcome)
    assert {k: error[k] for k in ("attempt", "class", "type", "message")} == {
        "attempt": 1, "class": "unknown", "type": "RuntimeError", "message": "kaboom"}
    assert "in boom" in error["traceback"]


async def test_error_fails_when_out_of_attempts(autojump_clock):
    h = Harness()
    outcome, label, _ = await h.runner.run(Attempt(claimed("boom", attempt=3, max_attempts=3)))
    assert (outcome.state, outcome.delay_s, outcome.refund, label) == ("failed", None, 0, "error")
    assert error_of(outcome)["class"] == "unknown"


async def test_fail_fails_on_the_first_attempt(autojump_clock):
    outcome, _, _ = await Harness().runner.run(Attempt(claimed("fatal", max_attempts=10)))
    assert outcome.state == "failed"
    assert error_of(outcome)["class"] == "fail"


async def test_retry_after_snoozes_and_refunds_the_attempt(autojump_clock):
    outcome, _, _ = await Harness().runner.run(
        Attempt(claimed("snooze", {"sleep_s": 30}, attempt=3, max_attempts=3)))
    assert (outcome.state, outcome.delay_s, outcome.refund) == ("scheduled", 30.0, 1)
    assert error_of(outcome)["class"] == "snooze"


async def test_retry_after_zero_is_available_now(autojump_clock):
    outcome, _, _ = await Harness().runner.run(Attempt(claimed("snooze", {"sleep_s": 0})))
    assert (outcome.state, outcome.delay_s, outcome.refund) == ("available", 0.0, 1)


async def test_snooze_burns_the_attempt_when_configured(autojump_clock):
    h = Harness(snooze_burns_attempt=True)
    outcome, _, _ = await h.runner.run(Attempt(claimed("snooze", {"sleep_s": 30})))
    assert (outcome.state, outcome.refund) == ("scheduled", 0)


async def test_timeout_from_the_declaration(autojump_clock):
    start = trio.current_time()
    outcome, label, run_s = await Harness().runner.run(
        Attempt(claimed("slow", {"sleep_s": 3600}, attempt=1)))
    assert label == "timed_out"
    assert run_s == pytest.approx(5.0)
    assert trio.current_time() - start == pytest.approx(5.0)
    assert outcome.state == "scheduled"
    assert outcome.delay_s is not None and 7.5 <= outcome.delay_s <= 12.5
    error = error_of(outcome)
    assert (error["class"], error["message"]) == ("timeout", "timed out after 5 s")


async def test_timeout_of_the_job_overrides_the_declaration_and_fails_when_out(autojump_clock):
    outcome, label, run_s = await Harness().runner.run(
        Attempt(claimed("slow", {"sleep_s": 3600}, attempt=2, max_attempts=2, timeout_s=0.5)))
    assert (label, outcome.state, outcome.delay_s) == ("timed_out", "failed", None)
    assert run_s == pytest.approx(0.5)


async def test_default_timeout_applies_when_nothing_else_does(autojump_clock):
    h = Harness(default_timeout_s=2.0)
    outcome, label, run_s = await h.runner.run(Attempt(claimed("nap", {"sleep_s": 3600})))
    assert (label, outcome.state) == ("timed_out", "scheduled")
    assert run_s == pytest.approx(2.0)


async def test_handler_finishing_within_its_timeout_completes(autojump_clock):
    outcome, label, run_s = await Harness().runner.run(
        Attempt(claimed("slow", {"sleep_s": 4.9})))
    assert (label, outcome.result) == ("completed", '"done"')
    assert run_s == pytest.approx(4.9)


async def run_and_stop(reason: str) -> tuple[Outcome, str, float]:
    attempt = Attempt(claimed("slow", {"sleep_s": 3600}, timeout_s=1000))
    box: list[tuple[Outcome, str, float]] = []

    async def run() -> None:
        box.append(await Harness().runner.run(attempt))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.sleep(10)
        attempt.stop(reason)
    return box[0]


async def test_stop_cancel_cancels_the_job(autojump_clock):
    outcome, label, run_s = await run_and_stop(CANCEL_REQUESTED)
    assert (label, outcome.state, outcome.refund) == ("cancelled", "cancelled", 0)
    assert run_s == pytest.approx(10.0)
    assert error_of(outcome)["class"] == "cancelled"


async def test_stop_shutdown_releases_the_job_with_a_refund(autojump_clock):
    outcome, label, _ = await run_and_stop(SHUTDOWN)
    assert (label, outcome.state, outcome.delay_s, outcome.refund) == (
        "released", "available", 0.0, 1)
    assert error_of(outcome)["class"] == "interrupted"


# --------------------------------------------------------------------------- failures before the handler


async def test_unknown_kind_fails_without_calling_anything(autojump_clock):
    outcome, label, _ = await Harness().runner.run(Attempt(claimed("gone")))
    assert (label, outcome.state) == ("failed", "failed")
    assert error_of(outcome)["class"] == "unknown_kind"


async def test_invalid_args_fail_as_validation(autojump_clock):
    outcome, _, _ = await Harness().runner.run(Attempt(claimed("ok", '{"n": "three"}')))
    assert outcome.state == "failed"
    error = error_of(outcome)
    assert error["class"] == "validation"
    assert "$.n" in error["message"]


async def test_unencodable_result_fails_as_validation(autojump_clock):
    outcome, label, _ = await Harness().runner.run(Attempt(claimed("unencodable")))
    assert (label, outcome.state) == ("failed", "failed")
    assert error_of(outcome)["class"] == "validation"


async def test_completing_in_the_handler_transaction(autojump_clock):
    h = Harness()
    outcome, label, _ = await h.runner.run(Attempt(claimed("in_tx", {"n": 4})))
    assert label == "committed"
    assert outcome == Outcome(id=11, token=5, state="completed", flow="ok")
    assert h.tx.executed == [("INSERT INTO t VALUES ($1)", (4,))]
    assert h.tx.finished == [
        Outcome(id=11, token=5, state="completed", result='{"n":4}', flow="ok")
    ]


# --------------------------------------------------------------------------- containment


class Returns(msgspec.Struct):
    what: str = ""


def returning(value: Any):
    """Register kind `ret` returning `value`."""
    @job("ret")
    async def ret(ctx: Context, args: Args) -> Any:
        return value


CRASHES = {
    "KeyboardInterrupt": KeyboardInterrupt,
    "SystemExit": SystemExit,
    "BaseException": BaseException,
    "GeneratorExit": GeneratorExit,
}


@pytest.mark.parametrize("name", [*CRASHES, "group"])
async def test_a_handler_raising_any_base_exception_fails_its_attempt_as_crashed(
        autojump_clock, name):
    @job("crash")
    async def crash(ctx: Context, args: Args) -> None:
        if name == "group":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                raise KeyboardInterrupt("in a nursery")
        raise CRASHES[name]("poison")

    outcome, label, _ = await Harness().runner.run(Attempt(claimed("crash", max_attempts=3)))
    error = error_of(outcome)
    assert (label, outcome.state, error["class"]) == ("error", "scheduled", "crashed")
    assert outcome.delay_s and outcome.delay_s > 0
    assert "in crash" in error["traceback"]  # the frame that raised is kept
    last, _, _ = await Harness().runner.run(Attempt(claimed("crash", attempt=3, max_attempts=3)))
    assert (last.state, error_of(last)["class"]) == ("failed", "crashed")


async def test_the_attempts_own_cancellation_still_wins(autojump_clock):
    outcome, label, _ = await Harness().runner.run(
        Attempt(claimed("slow", {"sleep_s": 60})))
    assert (label, error_of(outcome)["class"]) == ("timed_out", "timeout")
    with trio.CancelScope() as outer:  # a cancellation from outside goes on up
        attempt = Attempt(claimed("nap", {"sleep_s": 60}))
        outer.cancel()
        await Harness().runner.run(attempt)
    assert outer.cancelled_caught


async def test_a_result_with_a_nul_fails_as_invalid_value(autojump_clock):
    returning({"html": "<p>a\x00b</p>"})
    outcome, label, _ = await Harness().runner.run(Attempt(claimed("ret")))
    error = error_of(outcome)
    assert (outcome.state, outcome.result, error["class"]) == ("failed", None, "invalid_value")
    assert "NUL" in error["message"]


async def test_an_escaped_backslash_u0000_is_a_fine_result(autojump_clock):
    returning({"text": "\\u0000 is how JSON spells NUL"})
    outcome, _, _ = await Harness().runner.run(Attempt(claimed("ret")))
    assert outcome.state == "completed"
    assert msgspec.json.decode(outcome.result) == {"text": "\\u0000 is how JSON spells NUL"}


@pytest.mark.parametrize("value,words", [
    ({"s": "lone \ud800 surrogate"}, "surrogate"),
    (None, "self-referencing"),
])
async def test_unstorable_results_fail_as_invalid_value(autojump_clock, value, words):
    if value is None:
        value = {}
        value["me"] = value
    returning(value)
    outcome, label, _ = await Harness().runner.run(Attempt(claimed("ret")))
    error = error_of(outcome)
    assert (outcome.state, error["class"], label) == ("failed", "invalid_value", "error")
    assert words in error["message"]


async def test_a_result_over_the_limit_fails_as_result_too_large(autojump_clock):
    returning({"blob": "x" * 5000})
    outcome, _, _ = await Harness(max_result_bytes=4096).runner.run(Attempt(claimed("ret")))
    error = error_of(outcome)
    assert (outcome.state, error["class"]) == ("failed", "result_too_large")
    assert "5011 bytes" in error["message"] and "4096" in error["message"]
    ok, _, _ = await Harness(max_result_bytes=6000).runner.run(Attempt(claimed("ret")))
    assert ok.state == "completed"


async def test_error_messages_with_nul_and_surrogates_are_cleaned(autojump_clock):
    @job("dirty")
    async def dirty(ctx: Context, args: Args) -> None:
        raise RuntimeError("bad\x00byte and \udc80 here")

    outcome, _, _ = await Harness().runner.run(Attempt(claimed("dirty")))
    from actors.validate import has_nul

    outcome.error.encode("utf-8")  # no lone surrogate left
    assert not has_nul(outcome.error.encode())  # no NUL either
    assert error_of(outcome)["message"] == "bad\ufffdbyte and \ufffd here"


async def test_progress_refuses_non_strings_and_cleans_notes(autojump_clock):
    seen: list[str] = []

    @job("notes")
    async def notes(ctx: Context, args: Args) -> str:
        for pct, note in ((1, {"not": "a str"}), ("50", None), (float("nan"), None)):
            try:
                ctx.progress(pct, note)  # type: ignore[arg-type]
            except (TypeError, ValueError) as exc:
                seen.append(type(exc).__name__)
        ctx.progress(10, "nul\x00 and \ud800")
        return "ok"

    h = Harness()
    outcome, _, _ = await h.runner.run(Attempt(claimed("notes")))
    assert outcome.state == "completed"
    assert seen == ["TypeError", "TypeError", "ValueError"]
    assert h.progress == [(11, 5, 10.0, "nul\ufffd and \ufffd")]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5.0, 1e308])
async def test_an_insane_timeout_from_the_row_fails_as_invalid_value(autojump_clock, bad):
    outcome, label, _ = await Harness().runner.run(Attempt(claimed("ok", timeout_s=bad)))
    error = error_of(outcome)
    assert (outcome.state, error["class"], label) == ("failed", "invalid_value", "error")
    assert "timeout_s" in error["message"]


async def test_the_queue_timeout_then_the_global_max_runtime_apply(autojump_clock):
    h = Harness(default_timeout_s=3600.0, queue_timeout_s={"default": 2.0}.get)
    outcome, label, run_s = await h.runner.run(Attempt(claimed("nap", {"sleep_s": 10})))
    assert (label, run_s) == ("timed_out", 2.0)
    h = Harness(default_timeout_s=3.0, queue_timeout_s={}.get)
    outcome, label, run_s = await h.runner.run(Attempt(claimed("nap", {"sleep_s": 10})))
    assert (label, run_s) == ("timed_out", 3.0)
    # The kind's own timeout beats the queue's.
    h = Harness(default_timeout_s=3600.0, queue_timeout_s={"default": 1.0}.get)
    outcome, label, run_s = await h.runner.run(Attempt(claimed("slow", {"sleep_s": 10})))
    assert (label, run_s) == ("timed_out", 5.0)


# --------------------------------------------------------------------------- sync handlers


async def test_a_sync_handler_runs_on_a_thread_and_reports_progress():
    import threading

    loop_thread = threading.get_ident()
    ran_on: list[int] = []

    @job("sync_ok")
    def sync_ok(ctx: Context, args: Args) -> dict[str, Any]:
        ran_on.append(threading.get_ident())
        ctx.progress(40, "from a thread")
        return {"n": args.n, "kind": ctx.job.kind}

    h = Harness()
    outcome, label, _ = await h.runner.run(Attempt(claimed("sync_ok", {"n": 4})))
    assert (label, outcome.result) == ("completed", '{"n":4,"kind":"sync_ok"}')
    assert ran_on and ran_on[0] != loop_thread
    assert h.progress == [(11, 5, 40.0, "from a thread")]


async def test_a_timed_out_sync_handler_is_abandoned_and_told_at_its_next_progress():
    import threading

    go_on = threading.Event()
    told: list[str] = []

    @job("sync_slow", timeout=0.2)
    def sync_slow(ctx: Context, args: Args) -> None:
        go_on.wait(10)
        try:
            ctx.progress(1, "still here")
        except Abandoned:
            told.append("abandoned")
            raise

    outcome, label, _ = await Harness().runner.run(Attempt(claimed("sync_slow")))
    assert (label, error_of(outcome)["class"]) == ("timed_out", "timeout")
    go_on.set()
    for _ in range(100):
        if told:
            break
        await trio.sleep(0.02)
    assert told == ["abandoned"]


@pytest.mark.parametrize("seconds", [float("inf"), 1e300])
async def test_a_retry_after_no_clock_can_reach_fails_as_invalid_value(autojump_clock, seconds):
    @job("forever")
    async def forever(ctx: Context, args: Args) -> None:
        raise RetryAfter(seconds)

    outcome, _, _ = await Harness().runner.run(Attempt(claimed("forever")))
    error = error_of(outcome)
    assert (outcome.state, outcome.delay_s, error["class"]) == ("failed", None, "invalid_value")
    assert "not a usable delay" in error["message"]


async def test_an_exception_that_cannot_be_printed_is_still_recorded(autojump_clock):
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    class UnprintableBase(BaseException):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    @job("unprintable")
    async def unprintable(ctx: Context, args: Args) -> None:
        raise (Unprintable() if args.n == 0 else UnprintableBase())

    for n, cls in ((0, "unknown"), (1, "crashed")):
        outcome, _, _ = await Harness().runner.run(Attempt(claimed("unprintable", {"n": n})))
        error = error_of(outcome)
        assert (outcome.state, error["class"]) == ("scheduled", cls)
        assert error["type"].startswith("Unprintable")
