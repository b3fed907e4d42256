"""The Control service's commands against a real store: what each answers, what it
leaves in Postgres, and that bad input comes back as a typed JobdError with its code.

The edge checks on values (limits, NULs, unserved queues, truncated list fields) are in
tests/daemon/test_control_limits.py; this is the commands themselves.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio

from actors.context import Context
from actors.flow import FlowLimits, KeyLimits
from actors.handlers import Handlers
from actors.ports import NullObserver, Subscription
from actors.services.control import Control
from daemon.store import PgStore
from protocol import commands as c
from protocol.errors import ErrorCode, JobdError
from protocol.framing import PROTOCOL_VERSION
from protocol.jobs import JobSpec
from protocol.tree import TreeNode


class Args(msgspec.Struct, forbid_unknown_fields=True):
    n: int = 0


class Counted(NullObserver):
    def __init__(self) -> None:
        self.enqueued: list[tuple[str, str, int]] = []

    def jobs_enqueued(self, queue: str, kind: str, n: int) -> None:
        self.enqueued.append((queue, kind, n))


# The kinds these tests enqueue, in a registry of their own.
KINDS = Handlers()


@KINDS.job("work", max_attempts=4, priority=3)
async def work(ctx: Context, args: Args) -> None:
    return None


@KINDS.job("keyed", queue="crawl", key=lambda a: f"k{a.n}", cost=lambda a: a.n + 1)
async def keyed(ctx: Context, args: Args) -> None:
    return None


TREE = TreeNode(name="root", kind="supervisor", state="running")
PONG = c.Pong(daemon_id="d", region="r", version="v", ready=True, draining=False)


def control(store: Any, **options: Any) -> tuple[Control, list[int]]:
    """A Control for the queues `default` and `crawl`; the list collects the jobs it
    asked this daemon to stop (a cancel of a running job)."""
    stopped: list[int] = []

    async def cancel_here(job_id: int) -> None:
        stopped.append(job_id)

    options.setdefault("queues", lambda: {"default", "crawl"})
    return Control(store, server="jobd/test", pong=lambda: PONG, tree=lambda: TREE,
                   handlers=KINDS,
                   running_here=lambda: {"default": (1, 5)}, cancel_here=cancel_here,
                   **options), stopped


async def refused(ctl: Control, cmd: c.Command) -> JobdError:
    with pytest.raises(JobdError) as info:
        await ctl.handle(cmd)
    return info.value


# --------------------------------------------------------------------------- hello, ping


async def test_hello_agrees_on_the_lower_protocol_and_refuses_none(store):
    ctl, _ = control(store)
    hello = await ctl.handle(c.Hello(protocol=PROTOCOL_VERSION + 5))
    assert (hello.protocol, hello.server) == (PROTOCOL_VERSION, "jobd/test")
    assert hello.commands == c.COMMAND_NAMES
    error = await refused(ctl, c.Hello(protocol=0))
    assert error.code == ErrorCode.UNSUPPORTED_PROTOCOL
    assert error.details == {"min": 1, "max": PROTOCOL_VERSION}


async def test_ping_and_tree_answer_from_the_daemon(store):
    ctl, _ = control(store)
    assert await ctl.handle(c.Ping()) is PONG
    assert await ctl.handle(c.Tree()) is TREE


# --------------------------------------------------------------------------- enqueue


async def test_enqueue_fills_in_the_declaration_and_counts_what_it_created(store, sql):
    observer = Counted()
    ctl, _ = control(store, observer=observer)
    done = await ctl.handle(c.Enqueue(job=JobSpec(kind="work", args={"n": 2})))
    assert done.created and done.warning is None
    row = await store.get_job(done.id)
    assert (row["queue"], row["max_attempts"], row["priority"], row["state"]) == (
        "default", 4, 3, "available")
    keyed = await ctl.handle(c.Enqueue(job=JobSpec(kind="keyed", args={"n": 6})))
    row = await store.get_job(keyed.id)
    assert (row["queue"], row["key"]) == ("crawl", "k6")
    assert sql.fetchval("SELECT cost FROM jobd.jobs WHERE id = $1", keyed.id) == 7
    again = await ctl.handle(c.Enqueue(job=JobSpec(kind="work", unique_key="u")))
    same = await ctl.handle(c.Enqueue(job=JobSpec(kind="work", unique_key="u")))
    assert (same.id, same.created) == (again.id, False)
    assert observer.enqueued == [("default", "work", 1), ("crawl", "keyed", 1),
                                 ("default", "work", 1)]


async def test_enqueue_batch_answers_ids_in_order_and_names_a_bad_spec(store):
    ctl, _ = control(store)
    batch = await ctl.handle(c.EnqueueBatch(jobs=[JobSpec(kind="work", args={"n": i})
                                                  for i in range(3)]))
    assert batch.created == 3 and len(batch.ids) == 3 and batch.ids == sorted(batch.ids)
    error = await refused(ctl, c.EnqueueBatch(jobs=[JobSpec(kind="work"),
                                                    JobSpec(kind="nosuch")]))
    assert error.code == ErrorCode.UNKNOWN_KIND
    assert error.details == {"kind": "nosuch", "index": 1}
    assert len((await ctl.handle(c.List())).jobs) == 3  # the batch is all or nothing


async def test_a_spec_its_handler_refuses_is_a_typed_error(store):
    ctl, _ = control(store)
    unknown = await refused(ctl, c.Enqueue(job=JobSpec(kind="nosuch")))
    assert unknown.code == ErrorCode.UNKNOWN_KIND and unknown.details == {"kind": "nosuch"}
    wrong = await refused(ctl, c.Enqueue(job=JobSpec(kind="work", args={"n": "two"})))
    assert wrong.code == ErrorCode.INVALID_ARGS and wrong.details["kind"] == "work"
    extra = await refused(ctl, c.Enqueue(job=JobSpec(kind="work", args={"m": 1})))
    assert extra.code == ErrorCode.INVALID_ARGS
    attempts = await refused(ctl, c.Enqueue(job=JobSpec(kind="work", max_attempts=0)))
    assert attempts.code == ErrorCode.BAD_REQUEST
    assert attempts.details == {"field": "max_attempts"}
    assert (await ctl.handle(c.List())).jobs == []


async def test_too_many_jobs_in_one_batch_are_refused_before_any_is_built(store):
    ctl, _ = control(store)
    specs = [JobSpec(kind="nosuch")] * (c.MAX_BATCH + 1)
    error = await refused(ctl, c.EnqueueBatch(jobs=specs))
    assert error.code == ErrorCode.BAD_REQUEST and str(c.MAX_BATCH) in error.message


# --------------------------------------------------------------------------- one job


async def test_get_and_cancel_a_job_and_a_job_that_is_not_there(store):
    ctl, stopped = control(store)
    done = await ctl.handle(c.Enqueue(job=JobSpec(kind="work", tags=["t"])))
    view = await ctl.handle(c.Get(job_id=done.id))
    assert (view.id, view.kind, view.state, view.tags) == (done.id, "work", "available", ["t"])
    cancelled = await ctl.handle(c.Cancel(job_id=done.id))
    assert (cancelled.was, cancelled.state) == ("available", "cancelled")
    assert stopped == []  # nothing ran: nothing to stop
    for cmd in (c.Get(job_id=done.id + 99), c.Cancel(job_id=done.id + 99)):
        error = await refused(ctl, cmd)
        assert error.code == ErrorCode.NOT_FOUND and error.details == {"id": done.id + 99}


async def test_cancelling_a_running_job_asks_the_daemon_to_stop_it(store):
    ctl, stopped = control(store)
    done = await ctl.handle(c.Enqueue(job=JobSpec(kind="work")))
    [claimed] = await store.claim("default", 1, "d1", 30, ["work"])
    assert claimed.id == done.id
    cancelled = await ctl.handle(c.Cancel(job_id=done.id))
    assert (cancelled.was, cancelled.state) == ("running", "cancelling")
    assert stopped == [done.id]


async def test_watch_ends_with_the_finished_job(store, sql):
    ctl, _ = control(store)
    done = await ctl.handle(c.Enqueue(job=JobSpec(kind="work")))
    sql.execute("UPDATE jobd.jobs SET state = 'completed', finished_at = now() WHERE id = $1",
                done.id)
    assert [v.state async for v in ctl.watch(c.Watch(job_id=done.id))] == ["completed"]
    # Over HTTP a watch is one look at the job.
    assert (await ctl.handle(c.Watch(job_id=done.id))).state == "completed"


# --------------------------------------------------------------------------- many jobs


async def test_list_pages_newest_first_and_summary_counts_states(store, sql):
    ctl, _ = control(store)
    ids = (await ctl.handle(c.EnqueueBatch(jobs=[JobSpec(kind="work", tags=["day"])
                                                 for _ in range(5)]))).ids
    sql.execute("UPDATE jobd.jobs SET state = 'failed', finished_at = now() WHERE id = $1",
                ids[0])
    first = await ctl.handle(c.List(limit=3))
    assert [j.id for j in first.jobs] == ids[::-1][:3] and first.next_cursor == ids[2]
    rest = await ctl.handle(c.List(limit=3, cursor=first.next_cursor))
    assert [j.id for j in rest.jobs] == ids[1::-1] and rest.next_cursor is None
    failed = await ctl.handle(c.List(state=["failed"]))
    assert [j.id for j in failed.jobs] == [ids[0]]
    summary = await ctl.handle(c.Summary(tag="day"))
    assert (summary.total, summary.queued, summary.failed) == (5, 4, 1)
    assert summary.by_state == {"available": 4, "failed": 1}


async def test_bulk_operations_need_a_filter_and_honour_dry_run(store, sql):
    ctl, _ = control(store)
    ids = (await ctl.handle(c.EnqueueBatch(jobs=[JobSpec(kind="work")] * 3))).ids
    for cmd in (c.CancelMany(), c.Retry(), c.Delete(), c.Replay()):
        error = await refused(ctl, cmd)
        assert error.code == ErrorCode.BAD_REQUEST
        assert error.details == {"filters": list(c.FILTER_FIELDS)}
    dry = await ctl.handle(c.CancelMany(kind="work", dry_run=True))
    assert (dry.matched, dry.changed, dry.dry_run) == (3, 0, True)
    cancelled = await ctl.handle(c.CancelMany(ids=ids[:2]))
    assert (cancelled.matched, cancelled.changed) == (2, 2)
    retried = await ctl.handle(c.Retry(ids=[ids[0]]))
    assert retried.changed == 1
    assert (await store.get_job(ids[0]))["state"] == "available"
    replayed = await ctl.handle(c.Replay(ids=[ids[1]]))
    assert replayed.matched == 1 and len(replayed.ids) == 1
    assert (await store.get_job(replayed.ids[0]))["kind"] == "work"
    deleted = await ctl.handle(c.Delete(ids=[ids[1]]))
    assert deleted.changed == 1 and await store.get_job(ids[1]) is None


# --------------------------------------------------------------------------- queues, daemons


async def test_stats_counts_per_queue_with_pauses_and_flow_keys(store):
    limits = FlowLimits(default=KeyLimits(concurrency=2), keys={"k1": KeyLimits(concurrency=1)})
    ctl, _ = control(store, pauses=lambda: {("default", ""), ("crawl", "k1")},
                     flow_limits=lambda queue: limits if queue == "crawl" else None)
    await ctl.handle(c.Enqueue(job=JobSpec(kind="work")))
    await ctl.handle(c.Enqueue(job=JobSpec(kind="keyed", args={"n": 1})))
    stats = await ctl.handle(c.Stats())
    crawl, default = stats.queues  # by name
    assert (default.queue, default.counts, default.running_here, default.concurrency,
            default.paused) == ("default", {"available": 1}, 1, 5, True)
    assert (crawl.queue, crawl.paused, crawl.paused_keys) == ("crawl", False, ["k1"])
    [key] = stats.keys
    assert (key.queue, key.key, key.queued, key.concurrency_limit, key.breaker) == (
        "crawl", "k1", 1, 1, "closed")


async def test_pause_and_resume_a_queue_and_a_key(store):
    ctl, _ = control(store)
    paused = await ctl.handle(c.Pause(queue="crawl", key="ebay"))
    assert (paused.queue, paused.key, paused.paused) == ("crawl", "ebay", True)
    await ctl.handle(c.Pause(queue="default"))
    assert sorted(await store.list_pauses()) == [("crawl", "ebay"), ("default", "")]
    resumed = await ctl.handle(c.Resume(queue="default"))
    assert resumed.paused is False
    assert await store.list_pauses() == [("crawl", "ebay")]


async def test_nodes_lists_the_registered_daemons(store):
    ctl, _ = control(store)
    await store.register_daemon("d1", "eu", "host", 42, "1.0")
    [node] = (await ctl.handle(c.Nodes())).daemons
    assert (node.id, node.region, node.pid) == ("d1", "eu", 42)


async def test_drain_and_reload_go_to_the_daemon_or_are_unknown_without_one(store):
    ctl, _ = control(store)
    for cmd in (c.Drain(), c.Reload()):
        assert (await refused(ctl, cmd)).code == ErrorCode.UNKNOWN_COMMAND
    asked: list[bool] = []

    async def drain(on: bool) -> c.DrainResult:
        asked.append(on)
        return c.DrainResult(daemon_id="d", draining=on)

    async def reload() -> c.ReloadResult:
        return c.ReloadResult(ok=True, message="reloaded")

    ctl, _ = control(store, drain=drain, reload=reload)
    assert (await ctl.handle(c.Drain(undo=True))).draining is False
    assert asked == [False]
    assert (await ctl.handle(c.Reload())).message == "reloaded"


# --------------------------------------------------------------------------- events


async def test_send_event_stores_it_and_refuses_data_postgres_cannot_hold(store):
    ctl, _ = control(store, max_args_bytes=64)
    sent = await ctl.handle(c.SendEvent(name="paid", data={"order": 1}))
    assert sent.id > 0 and sent.woken == []
    big = await refused(ctl, c.SendEvent(name="paid", data={"x": "y" * 100}))
    assert big.code == ErrorCode.TOO_LARGE and big.details["limit"] == 64
    nul = await refused(ctl, c.SendEvent(name="paid", data={"x": "\x00"}))
    assert nul.code == ErrorCode.BAD_REQUEST and nul.details == {"field": "data"}


async def test_concurrent_single_sends_share_statements_and_a_bad_one_fails_alone(store, sql):
    """A key path value jobd.enqueue refuses (over 512 characters) fails that send only,
    though it went into one statement with the others (group commit)."""
    await store.register_daemon("d1", "test", "host", 1, "0")
    await store.sync_subscriptions("d1", [Subscription(
        event="tick", kind="work", action="start", key_path=["k"])], ["work"], 60)
    ctl, _ = control(store)
    answers: dict[int, Any] = {}

    async def send(i: int) -> None:
        key = "x" * 600 if i == 7 else f"k{i}"
        try:
            answers[i] = await ctl.handle(c.SendEvent(
                name="tick", data={"k": key}, idempotency_key="bad" if i == 7 else f"t{i % 10}"))
        except JobdError as exc:
            answers[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(send, i)
    bad = [i for i, a in answers.items() if isinstance(a, JobdError)]
    assert bad == [7] and answers[7].code == ErrorCode.BAD_REQUEST
    assert "key must be 1 to 512" in answers[7].message
    created = [i for i, a in answers.items() if not isinstance(a, JobdError) and a.created]
    assert len(created) == 10  # t0..t9 once each (t7 by 17 alone)
    assert sql.fetchval("SELECT count(*) FROM jobd.events") == len(created)
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == len(created)


# --------------------------------------------------------------------------- the store fails


async def test_a_store_that_cannot_answer_is_unavailable_and_a_refused_value_bad_request(
        store, fresh_database):
    # The store's pool stops answering: the database went away under it.
    gone = PgStore(fresh_database, pool_min=1, pool_max=1, timeout_s=2.0)
    await gone.connect()
    try:
        await gone.close()
        down, _ = control(gone)
        error = await refused(down, c.Stats())
        assert error.code == ErrorCode.UNAVAILABLE
    finally:
        await gone.close()
    # An id past bigint reaches Postgres (a Struct built in code is not range-checked as
    # a decoded one is) and is refused there.
    rejected, _ = control(store)
    error = await refused(rejected, c.Get(job_id=2**63))
    assert error.code == ErrorCode.BAD_REQUEST
