"""The hidden `jobd.on_failure` job (actors/failure_hooks.py): which kinds are hooked,
what the hook job does with a failed job (runs the handler's `on_failure` with its args
and last error, once per step even when it runs again), and when it declines.

Real Postgres: the failure trigger enqueues the hook job, the hook reads the job and
memoizes its steps through the store, as in the daemon.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from actors.context import Context, JobInfo
from actors.errors import Fail
from actors.failure_hooks import KIND, HookArgs, hooked_kinds, run_failure_hook
from actors.handlers import HANDLERS, Handlers, job
from actors.ports import NewJob, Outcome


class Credits(msgspec.Struct):
    credits: int


@pytest.fixture(autouse=True)
def registry(empty_handlers) -> Iterator[Handlers]:
    """Each test declares its kinds with @job into an emptied HANDLERS, put back after."""
    yield HANDLERS


class Refunds:
    """A doomed kind whose hook refunds in a step; records every call it sees."""

    def __init__(self) -> None:
        self.hooked: list[tuple[Any, Any]] = []
        self.refunded: list[int] = []

        async def refund(ctx: Context, args: Credits, error: Any) -> None:
            self.hooked.append((args, error))
            await ctx.step("refund", self.refunded.append, args.credits)

        @job("wf.doomed", on_failure=refund)
        async def doomed(ctx: Context, args: Credits) -> None:
            raise Fail("no")

        @job("wf.plain")
        async def plain(ctx: Context, args: Credits) -> None:
            return None


def context_for(store: Any, job_id: int, token: int) -> Context:
    at = datetime(2025, 10, 14, tzinfo=UTC)
    info = JobInfo(id=job_id, kind=KIND, queue="default", key=None, attempt=1, max_attempts=10,
                   tags=[], unique_key=None, priority=0, run_at=at, created_at=at, errors=[])
    return Context(info, token, report_progress=lambda *a: None, transaction=lambda: None,
                   now=lambda: 0.0, progress_every_items=100, progress_every_s=60.0,
                   steps=store, handlers=HANDLERS)


async def fail(store: Any, kind: str, error: dict[str, Any]) -> int:
    """Enqueue `kind` with 5 credits, claim it and record its failure; its id."""
    [done] = await store.enqueue_many([NewJob(kind=kind, args='{"credits": 5}')])
    [claimed] = await store.claim("default", 1, "d1", 30.0, [kind])
    await store.finish_many([Outcome(id=done.id, token=claimed.lease_token, state="failed",
                                     error=msgspec.json.encode(error).decode())])
    return done.id


async def hook_job(store: Any, sql: Any, failed_id: int) -> tuple[int, int]:
    """The hook job the failure enqueued, claimed: (id, lease token)."""
    [row] = sql.fetch("SELECT id, args::text FROM jobd.jobs WHERE kind = $1", KIND)
    assert msgspec.json.decode(row["args"]) == {"job_id": failed_id}
    [claimed] = await store.claim("default", 1, "d1", 30.0, [KIND])
    return claimed.id, claimed.lease_token


def test_only_kinds_with_an_on_failure_hook_are_hooked() -> None:
    Refunds()

    async def hook(ctx: Context, args: Any, error: Any) -> None:
        return None

    @job("a.hooked", on_failure=hook)
    async def a(ctx: Context, args: dict[str, Any]) -> None:
        return None

    assert hooked_kinds(HANDLERS) == ["a.hooked", "wf.doomed"]  # sorted; wf.plain has none


async def test_the_hook_runs_with_the_jobs_args_and_last_error_and_its_steps_once(
        store, sql) -> None:
    kinds = Refunds()
    await store.register_failure_hooks(hooked_kinds(HANDLERS))
    failed = await fail(store, "wf.doomed", {"class": "fail", "message": "no"})
    hook_id, token = await hook_job(store, sql, failed)
    result = await run_failure_hook(context_for(store, hook_id, token), HookArgs(job_id=failed))
    assert result == {"job_id": failed, "hook": "ran"}
    [(args, error)] = kinds.hooked
    assert args == Credits(credits=5)
    assert (error["class"], error["message"]) == ("fail", "no")
    assert kinds.refunded == [5]
    # The hook job runs again (its daemon crashed after the step): the step is memoized.
    again = await run_failure_hook(context_for(store, hook_id, token), HookArgs(job_id=failed))
    assert again == result
    assert len(kinds.hooked) == 2 and kinds.refunded == [5]


async def test_no_hook_job_for_a_kind_without_a_hook(store, sql) -> None:
    Refunds()
    await store.register_failure_hooks(hooked_kinds(HANDLERS))
    await fail(store, "wf.plain", {"class": "fail"})
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE kind = $1", KIND) == 0


async def test_the_hook_declines_a_job_that_is_gone_unhooked_or_no_longer_failed(
        store, sql) -> None:
    kinds = Refunds()
    ctx = context_for(store, 1, 1)
    assert await run_failure_hook(ctx, HookArgs(job_id=999_999)) == {
        "job_id": 999_999, "skipped": "job no longer exists"}
    plain = await fail(store, "wf.plain", {"class": "fail"})
    assert await run_failure_hook(ctx, HookArgs(job_id=plain)) == {
        "job_id": plain, "skipped": "no on_failure hook"}
    # Retried by hand before its hook ran: the hook job fails rather than refund a live job.
    doomed = await fail(store, "wf.doomed", {"class": "fail"})
    sql.execute("UPDATE jobd.jobs SET state = 'available', finished_at = NULL WHERE id = $1",
                doomed)
    with pytest.raises(Fail, match=f"job {doomed} is available, not failed"):
        await run_failure_hook(ctx, HookArgs(job_id=doomed))
    assert kinds.hooked == []
