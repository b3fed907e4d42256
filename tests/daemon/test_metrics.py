"""daemon.metrics: the observer, the exposition, the bounded key label, the queue gauges.

The exposition is parsed back with prometheus_client's own parser and, when promtool is
on PATH, linted by `promtool check metrics` (.ci/run installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from actors.clock import TrioClock
from actors.mailbox import Mailbox
from actors.ports import NewJob, Outcome
from actors.registry import Registry
from daemon.metrics import (
    BATCH_BUCKETS,
    DB_BUCKETS,
    JOB_BUCKETS,
    OTHER_KEY,
    KeyLabels,
    Metrics,
    run_queue_gauges,
)

FIXED = {
    "jobd_jobs_enqueued": "counter",
    "jobd_jobs_started": "counter",
    "jobd_jobs_finished": "counter",
    "jobd_job_errors": "counter",
    "jobd_rate_limit_waits": "counter",
    "jobd_key_pauses": "counter",
    "jobd_breaker_openings": "counter",
    "jobd_actor_restarts": "counter",
    "jobd_job_run_seconds": "histogram",
    "jobd_job_wait_seconds": "histogram",
    "jobd_db_round_trip_seconds": "histogram",
    "jobd_claim_batch_size": "histogram",
    "jobd_queue_jobs": "gauge",
    "jobd_queue_oldest_available_age_seconds": "gauge",
    "jobd_running_jobs": "gauge",
    "jobd_key_running_jobs": "gauge",
    "jobd_key_effective_rate": "gauge",
    "jobd_key_breaker_open": "gauge",
    "jobd_daemon_info": "gauge",
    "jobd_daemon_ready": "gauge",
    "jobd_mailbox_messages": "gauge",
}


def families(metrics: Metrics) -> dict[str, object]:
    body, _ = metrics.exposition()
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition()[0].decode()):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def make(**kwargs) -> Metrics:
    return Metrics(version="1.2.3", region="eu", daemon_id="host-1-abc", **kwargs)


def test_every_fixed_metric_is_exported_with_its_type():
    found = families(make())
    for name, kind in FIXED.items():
        assert name in found, name
        assert found[name].type == kind, name
    # The process and GC collectors live on the daemon's registry too.
    assert "process_cpu_seconds" in found or "process_start_time_seconds" in found
    assert "python_gc_objects_collected" in found


def test_no_created_series():
    metrics = make()
    metrics.observer.job_finished("default", "k", "completed", 0.1)
    assert b"_created" not in metrics.exposition()[0]


def test_observer_counts_and_observes():
    metrics = make()
    o = metrics.observer
    o.jobs_enqueued("default", "k", 3)
    o.job_started("default", "k", 2.0)
    o.job_finished("default", "k", "completed", 0.3)
    o.job_finished("default", "k", "retried", 0.2)
    o.job_finished("default", "k", "released", 99.0)
    o.jobs_rescued("default", "k", 2)
    o.error_classified("default", "network")
    o.actor_restarted("pool:default")
    o.claim_batch("default", 7)
    o.db_round_trip("claim", 0.002)
    assert samples(metrics, "jobd_jobs_enqueued_total") == {
        (("kind", "k"), ("queue", "default")): 3.0}
    finished = samples(metrics, "jobd_jobs_finished_total")
    key = lambda outcome: (("kind", "k"), ("outcome", outcome), ("queue", "default"))  # noqa: E731
    assert finished == {key("completed"): 1, key("retried"): 1, key("released"): 1,
                        key("rescued"): 2}
    assert samples(metrics, "jobd_job_errors_total") == {
        (("error_class", "network"), ("queue", "default")): 1}
    assert samples(metrics, "jobd_actor_restarts_total") == {(("actor", "pool:default"),): 1}
    # A released attempt was interrupted by shutdown: its run time is not a run time.
    assert samples(metrics, "jobd_job_run_seconds_count") == {
        (("kind", "k"), ("queue", "default")): 2}
    assert samples(metrics, "jobd_job_wait_seconds_sum") == {
        (("kind", "k"), ("queue", "default")): 2.0}
    assert samples(metrics, "jobd_claim_batch_size_sum") == {(("queue", "default"),): 7}
    assert samples(metrics, "jobd_db_round_trip_seconds_count") == {(("operation", "claim"),): 1}


def test_observer_never_raises():
    o = make().observer
    o.job_started("q", "k", "not a number")  # type: ignore[arg-type]
    o.job_finished("q", "k", "completed", None)  # type: ignore[arg-type]
    o.jobs_enqueued("q", "k", -1)  # counters refuse to go down; dropped
    o.claim_batch("q", object())  # type: ignore[arg-type]


@pytest.mark.parametrize("name, buckets, labels", [
    ("jobd_job_run_seconds", JOB_BUCKETS, ("default", "k")),
    ("jobd_job_wait_seconds", JOB_BUCKETS, ("default", "k")),
    ("jobd_db_round_trip_seconds", DB_BUCKETS, ("claim",)),
    ("jobd_claim_batch_size", BATCH_BUCKETS, ("default",)),
])
def test_bucket_bounds(name, buckets, labels):
    metrics = make()
    histogram = {"jobd_job_run_seconds": metrics.run_seconds,
                 "jobd_job_wait_seconds": metrics.wait_seconds,
                 "jobd_db_round_trip_seconds": metrics.db_seconds,
                 "jobd_claim_batch_size": metrics.claim_batch}[name]
    histogram.labels(*labels).observe(1)
    bounds = [float(dict(k)["le"]) for k in samples(metrics, name + "_bucket")]
    assert sorted(bounds) == [float(b) for b in buckets] + [float("inf")]


def test_job_buckets_span_10ms_to_2h():
    assert JOB_BUCKETS[0] == 0.01 and JOB_BUCKETS[-1] == 7200
    assert DB_BUCKETS[0] == 0.0005 and DB_BUCKETS[-1] == 5


def test_live_gauges_read_the_daemon_at_scrape_time():
    running = {"default": (3, 10), "crawl": (0, 4)}
    registry = Registry()
    box: Mailbox[int] = Mailbox("completer", capacity=10)
    registry.register("completer", box)
    ready = [False]
    metrics = make(running=lambda: running, mailboxes=registry, ready=lambda: ready[0])
    metrics.init_queues(["default", "idle"])
    box.tell_nowait(1)
    box.tell_nowait(2)
    assert samples(metrics, "jobd_running_jobs") == {
        (("queue", "crawl"),): 0, (("queue", "default"),): 3, (("queue", "idle"),): 0}
    assert samples(metrics, "jobd_queue_concurrency") == {
        (("queue", "crawl"),): 4, (("queue", "default"),): 10}
    assert samples(metrics, "jobd_mailbox_messages") == {(("actor", "completer"),): 2}
    assert samples(metrics, "jobd_daemon_ready") == {(): 0}
    ready[0] = True
    running["default"] = (5, 10)
    assert samples(metrics, "jobd_daemon_ready") == {(): 1}
    assert samples(metrics, "jobd_running_jobs")[(("queue", "default"),)] == 5
    assert samples(metrics, "jobd_daemon_info") == {
        (("daemon_id", "host-1-abc"), ("region", "eu"), ("version", "1.2.3")): 1}


def test_key_labels_are_bounded():
    keys = KeyLabels(limit=2, allow=["vip"])
    assert [keys("q", k) for k in ("a", "b", "c", "a", "vip")] == ["a", "b", OTHER_KEY, "a", "vip"]
    assert keys("other-queue", "c") == "c"  # the limit is per queue
    top = keys.top("q", {"a": 1, "b": 5, "c": 3, "d": 2, "vip": 0})
    assert top == {"vip": 0, "b": 5, "c": 3, OTHER_KEY: 3}


def test_key_counters_and_gauges_stay_bounded():
    metrics = make(key_series_limit=1)
    for key in ("acme", "globex", "initech"):
        metrics.observer.rate_limit_waited("crawl", key)
    assert samples(metrics, "jobd_rate_limit_waits_total") == {
        (("key", "acme"), ("queue", "crawl")): 1, (("key", OTHER_KEY), ("queue", "crawl")): 2}
    metrics.observer.key_snapshot("crawl", {"acme": 1, "globex": 4}, {"acme": 2.0},
                                  {"acme": True})
    assert samples(metrics, "jobd_key_running_jobs") == {
        (("key", "globex"), ("queue", "crawl")): 4, (("key", OTHER_KEY), ("queue", "crawl")): 1}
    assert samples(metrics, "jobd_key_breaker_open") == {(("key", "acme"), ("queue", "crawl")): 1}


def test_queue_gauges_only_on_the_leader():
    metrics = make()
    metrics.init_queues(["default", "crawl"])
    gauges = metrics.queue_gauges
    gauges.update([("default", "available", 4)], [("default", 12.5)])
    assert samples(metrics, "jobd_queue_jobs") == {}  # not the leader: nothing exported
    gauges.leader = True
    jobs = samples(metrics, "jobd_queue_jobs")
    assert jobs[(("queue", "default"), ("state", "available"))] == 4
    assert jobs[(("queue", "crawl"), ("state", "available"))] == 0  # known queues get zeros
    assert samples(metrics, "jobd_queue_oldest_available_age_seconds") == {
        (("queue", "crawl"),): 0, (("queue", "default"),): 12.5}
    assert samples(metrics, "jobd_metrics_leader") == {(): 1}
    gauges.clear()
    assert samples(metrics, "jobd_queue_jobs") == {}
    assert samples(metrics, "jobd_metrics_leader") == {(): 0}


def test_openmetrics_on_request():
    body, content_type = make().exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (apt-get install --no-install-recommends prometheus)")
def test_promtool_accepts_the_exposition():
    registry = Registry()
    registry.register("completer", Mailbox("completer"))
    metrics = make(running=lambda: {"default": (1, 10)}, mailboxes=registry)
    metrics.init_queues(["default"])
    o = metrics.observer
    o.jobs_enqueued("default", "k", 1)
    o.job_started("default", "k", 0.5)
    o.job_finished("default", "k", "completed", 0.5)
    o.error_classified("default", "unknown")
    o.claim_batch("default", 1)
    o.db_round_trip("claim", 0.001)
    o.rate_limit_waited("default", "acme")
    metrics.queue_gauges.leader = True
    metrics.queue_gauges.update([("default", "available", 1)], [("default", 1.0)])
    body, _ = metrics.exposition()
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()


# --------------------------------------------------------------------------- against Postgres


async def test_queue_gauge_queries(store):
    done = await store.enqueue_many([NewJob(kind="k"), NewJob(kind="k"),
                                     NewJob(kind="k", queue="crawl", delay_s=3600)])
    claimed = await store.claim("default", 1, "d1", 30.0, ["k"])
    assert len(claimed) == 1
    await store.finish_many([Outcome(id=claimed[0].id, token=claimed[0].lease_token,
                                     state="completed")])
    row = await store.get_job(done[1].id)
    async with store.metrics_session() as session:
        counts, oldest = await session.queue_gauges(now=row["run_at"] + timedelta(seconds=90))
    assert sorted(counts) == [("crawl", "scheduled", 1), ("default", "available", 1),
                              ("default", "completed", 1)]
    assert [(q, round(age)) for q, age in oldest] == [("default", 90)]


async def test_one_leader_per_database_and_takeover(store):
    async with store.metrics_session() as first:
        async with store.metrics_session() as second:
            assert await first.try_lead() is True
            assert await second.try_lead() is False
        async with store.metrics_session() as third:
            assert await third.try_lead() is False
    # The leader's connection closed, and its session lock went with it (once the
    # server's backend has noticed: poll briefly).
    async with store.metrics_session() as fourth:
        with trio.fail_after(10):
            while not await fourth.try_lead():  # noqa: ASYNC110 - polling the server
                await trio.sleep(0.02)


async def test_run_queue_gauges_refreshes_on_the_leader_only(store):
    await store.enqueue_many([NewJob(kind="k")])
    leader, follower = make(), make()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run_queue_gauges(
            store, leader, interval_s=0.05, clock=TrioClock(), task_status=task_status))
        with trio.fail_after(10):
            while not samples(leader, "jobd_queue_jobs"):  # noqa: ASYNC110 - its next tick
                await trio.sleep(0.02)
        await nursery.start(lambda task_status: run_queue_gauges(
            store, follower, interval_s=0.05, clock=TrioClock(), task_status=task_status))
        await trio.sleep(0.3)
        assert samples(follower, "jobd_metrics_leader") == {(): 0}
        assert samples(follower, "jobd_queue_jobs") == {}
        assert samples(leader, "jobd_queue_jobs")[(("queue", "default"), ("state", "available"))] == 1
        nursery.cancel_scope.cancel()
    assert samples(leader, "jobd_metrics_leader") == {(): 0}
