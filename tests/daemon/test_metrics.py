"""daemon.metrics: the observer, the exposition, the bounded key label, the queue gauges.

The leader election itself is tested with the Peer (tests/actors/services/test_peer.py);
here the gauges follow it.

The exposition is parsed back with prometheus_client's own parser and, when promtool is
on PATH, linted by `promtool check metrics` (.ci/run installs it).
"""

from __future__ import annotations

import math
import random
import shutil
import subprocess
from datetime import timedelta

import pytest
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from actors.ports import NewJob, Outcome
from actors.runtime.clock import TrioClock
from actors.runtime.mailbox import Mailbox
from actors.runtime.registry import Registry
from actors.services.peer import Check, Leadership, Peer
from daemon.metrics import (
    BATCH_BUCKETS,
    DB_BUCKETS,
    JOB_BUCKETS,
    OTHER_KEY,
    OUTCOMES,
    KeyLabels,
    Metrics,
    run_queue_gauges,
)
from daemon.metrics.observer import Drops
from tests.actors.services.test_peer import leader_pid

FIXED = {
    "jobd_jobs_enqueued": "counter",
    "jobd_jobs_started": "counter",
    "jobd_jobs_finished": "counter",
    "jobd_job_errors": "counter",
    "jobd_key_pauses": "counter",
    "jobd_breaker_openings": "counter",
    "jobd_actor_restarts": "counter",
    "jobd_notifications_dropped": "counter",
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
    metrics = make()
    o = metrics.observer
    o.job_started("q", "k", "not a number")  # type: ignore[arg-type]
    o.job_finished("q", "k", "completed", None)  # type: ignore[arg-type]
    o.jobs_enqueued("q", "k", -1)  # counters refuse to go down; dropped
    o.jobs_enqueued("q", "k", math.nan)
    o.claim_batch("q", object())  # type: ignore[arg-type]
    o.db_round_trip("claim", math.nan)  # NaN would poison the sum for good; dropped
    o.job_started("q", "k", math.nan)
    o.job_started(["unhashable"], "k", 1.0)  # type: ignore[arg-type]
    o.error_classified("q", object)  # type: ignore[arg-type]  # str()ed, as labels() did
    # The counter half of a hook still counts when the histogram half drops its value.
    assert samples(metrics, "jobd_jobs_started_total") == {(("kind", "k"), ("queue", "q")): 2}
    assert samples(metrics, "jobd_jobs_enqueued_total") == {}
    assert samples(metrics, "jobd_db_round_trip_seconds_count") == {}
    assert samples(metrics, "jobd_job_wait_seconds_count") == {}
    assert samples(metrics, "jobd_job_errors_total") == {
        (("error_class", "<class 'object'>"), ("queue", "q")): 1}
    assert samples(metrics, "jobd_job_run_seconds_count") == {}
    assert o.drops.counts == {"job_started": 3, "job_finished": 1, "jobs_enqueued": 2,
                              "claim_batch": 1, "db_round_trip": 1}


def test_a_dropped_observation_is_logged_once_a_minute_per_hook(caplog):
    now = [100.0]
    drops = Drops(every_s=60.0, now=lambda: now[0])
    metrics = make()
    o = metrics.observer
    o.drops = drops
    with caplog.at_level("WARNING", logger="jobd.metrics"):
        for _ in range(5):
            o.db_round_trip("claim", math.nan)
        o.claim_batch("q", object())  # type: ignore[arg-type]  # another hook: its own line
        now[0] += 61
        o.db_round_trip("claim", math.nan)
    logged = [(r.hook, r.dropped) for r in caplog.records if r.event == "metrics.dropped"]
    assert logged == [("db_round_trip", 1), ("claim_batch", 1), ("db_round_trip", 6)]
    assert all(r.exc_info for r in caplog.records if r.event == "metrics.dropped")
    assert drops.counts == {"db_round_trip": 6, "claim_batch": 1}


def test_label_values_are_strs():
    metrics = make()
    metrics.observer.claim_batch(7, 3)  # type: ignore[arg-type]
    metrics.observer.claim_batch("7", 4)
    assert samples(metrics, "jobd_claim_batch_size_count") == {(("queue", "7"),): 2}
    with pytest.raises(ValueError):
        metrics.claim_batch.observe(("a", "b"), 1)  # one label, two values


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
    histogram.observe(labels, 1)
    bounds = [float(dict(k)["le"]) for k in samples(metrics, name + "_bucket")]
    assert sorted(bounds) == [float(b) for b in buckets] + [float("inf")]


# What prometheus_client's own Counter and Histogram exported for these observations
# (generated with them, before the hooks moved to plain accumulators): names, HELP/TYPE,
# label order, series order, cumulative buckets with +Inf last, _count, _sum.
HOT = ("jobd_jobs_enqueued", "jobd_jobs_started", "jobd_jobs_finished", "jobd_job_errors",
       "jobd_job_run_seconds", "jobd_job_wait_seconds", "jobd_db_round_trip_seconds",
       "jobd_claim_batch_size")
HOT_EXPOSITION = """\
# HELP jobd_jobs_enqueued_total Jobs created through the control API.
# TYPE jobd_jobs_enqueued_total counter
jobd_jobs_enqueued_total{kind="k",queue="default"} 3.0
# HELP jobd_jobs_started_total Attempts started.
# TYPE jobd_jobs_started_total counter
jobd_jobs_started_total{kind="k",queue="default"} 3.0
# HELP jobd_jobs_finished_total Attempts ended, by outcome (completed, failed, retried, cancelled, timed_out, rescued, released).
# TYPE jobd_jobs_finished_total counter
jobd_jobs_finished_total{kind="k",outcome="completed",queue="default"} 1.0
jobd_jobs_finished_total{kind="k",outcome="failed",queue="default"} 1.0
jobd_jobs_finished_total{kind="k",outcome="released",queue="default"} 1.0
jobd_jobs_finished_total{kind="k",outcome="rescued",queue="default"} 2.0
# HELP jobd_job_errors_total Attempts that raised, by error class.
# TYPE jobd_job_errors_total counter
jobd_job_errors_total{error_class="network",queue="default"} 1.0
# HELP jobd_job_run_seconds Attempt run time.
# TYPE jobd_job_run_seconds histogram
jobd_job_run_seconds_bucket{kind="k",le="0.01",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="0.025",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="0.05",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="0.1",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="0.25",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="0.5",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="1.0",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="2.5",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="5.0",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="10.0",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="30.0",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="60.0",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="120.0",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="300.0",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="600.0",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="900.0",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="1800.0",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="3600.0",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="7200.0",queue="default"} 1.0
jobd_job_run_seconds_bucket{kind="k",le="+Inf",queue="default"} 2.0
jobd_job_run_seconds_count{kind="k",queue="default"} 2.0
jobd_job_run_seconds_sum{kind="k",queue="default"} 1e+300
# HELP jobd_job_wait_seconds Time from a job's run_at to its attempt's start.
# TYPE jobd_job_wait_seconds histogram
jobd_job_wait_seconds_bucket{kind="k",le="0.01",queue="default"} 2.0
jobd_job_wait_seconds_bucket{kind="k",le="0.025",queue="default"} 2.0
jobd_job_wait_seconds_bucket{kind="k",le="0.05",queue="default"} 2.0
jobd_job_wait_seconds_bucket{kind="k",le="0.1",queue="default"} 2.0
jobd_job_wait_seconds_bucket{kind="k",le="0.25",queue="default"} 3.0
jobd_job_wait_seconds_bucket{kind="k",le="0.5",queue="default"} 3.0
jobd_job_wait_seconds_bucket{kind="k",le="1.0",queue="default"} 3.0
jobd_job_wait_seconds_bucket{kind="k",le="2.5",queue="default"} 3.0
jobd_job_wait_seconds_bucket{kind="k",le="5.0",queue="default"} 3.0
jobd_job_wait_seconds_bucket{kind="k",le="10.0",queue="default"} 3.0
jobd_job_wait_seconds_bucket{kind="k",le="30.0",queue="default"} 3.0
jobd_job_wait_seconds_bucket{kind="k",le="60.0",queue="default"} 3.0
jobd_job_wait_seconds_bucket{kind="k",le="120.0",queue="default"} 3.0
jobd_job_wait_seconds_bucket{kind="k",le="300.0",queue="default"} 3.0
jobd_job_wait_seconds_bucket{kind="k",le="600.0",queue="default"} 3.0
jobd_job_wait_seconds_bucket{kind="k",le="900.0",queue="default"} 3.0
jobd_job_wait_seconds_bucket{kind="k",le="1800.0",queue="default"} 3.0
jobd_job_wait_seconds_bucket{kind="k",le="3600.0",queue="default"} 3.0
jobd_job_wait_seconds_bucket{kind="k",le="7200.0",queue="default"} 3.0
jobd_job_wait_seconds_bucket{kind="k",le="+Inf",queue="default"} 3.0
jobd_job_wait_seconds_count{kind="k",queue="default"} 3.0
jobd_job_wait_seconds_sum{kind="k",queue="default"} 0.25
# HELP jobd_db_round_trip_seconds Store call time, trio to Postgres and back.
# TYPE jobd_db_round_trip_seconds histogram
jobd_db_round_trip_seconds_bucket{le="0.0005",operation="claim"} 1.0
jobd_db_round_trip_seconds_bucket{le="0.001",operation="claim"} 1.0
jobd_db_round_trip_seconds_bucket{le="0.0025",operation="claim"} 1.0
jobd_db_round_trip_seconds_bucket{le="0.005",operation="claim"} 1.0
jobd_db_round_trip_seconds_bucket{le="0.01",operation="claim"} 1.0
jobd_db_round_trip_seconds_bucket{le="0.025",operation="claim"} 1.0
jobd_db_round_trip_seconds_bucket{le="0.05",operation="claim"} 1.0
jobd_db_round_trip_seconds_bucket{le="0.1",operation="claim"} 1.0
jobd_db_round_trip_seconds_bucket{le="0.25",operation="claim"} 1.0
jobd_db_round_trip_seconds_bucket{le="0.5",operation="claim"} 1.0
jobd_db_round_trip_seconds_bucket{le="1.0",operation="claim"} 1.0
jobd_db_round_trip_seconds_bucket{le="2.5",operation="claim"} 1.0
jobd_db_round_trip_seconds_bucket{le="5.0",operation="claim"} 1.0
jobd_db_round_trip_seconds_bucket{le="+Inf",operation="claim"} 2.0
jobd_db_round_trip_seconds_count{operation="claim"} 2.0
jobd_db_round_trip_seconds_sum{operation="claim"} 7.5005
# HELP jobd_claim_batch_size Jobs per non-empty claim.
# TYPE jobd_claim_batch_size histogram
jobd_claim_batch_size_bucket{le="1.0",queue="default"} 1.0
jobd_claim_batch_size_bucket{le="2.0",queue="default"} 1.0
jobd_claim_batch_size_bucket{le="5.0",queue="default"} 1.0
jobd_claim_batch_size_bucket{le="10.0",queue="default"} 1.0
jobd_claim_batch_size_bucket{le="20.0",queue="default"} 1.0
jobd_claim_batch_size_bucket{le="50.0",queue="default"} 1.0
jobd_claim_batch_size_bucket{le="100.0",queue="default"} 1.0
jobd_claim_batch_size_bucket{le="200.0",queue="default"} 2.0
jobd_claim_batch_size_bucket{le="500.0",queue="default"} 2.0
jobd_claim_batch_size_bucket{le="1000.0",queue="default"} 2.0
jobd_claim_batch_size_bucket{le="2000.0",queue="default"} 2.0
jobd_claim_batch_size_bucket{le="+Inf",queue="default"} 2.0
jobd_claim_batch_size_count{queue="default"} 2.0
jobd_claim_batch_size_sum{queue="default"} 200.0
jobd_claim_batch_size_bucket{le="1.0",queue="idle"} 0.0
jobd_claim_batch_size_bucket{le="2.0",queue="idle"} 0.0
jobd_claim_batch_size_bucket{le="5.0",queue="idle"} 0.0
jobd_claim_batch_size_bucket{le="10.0",queue="idle"} 0.0
jobd_claim_batch_size_bucket{le="20.0",queue="idle"} 0.0
jobd_claim_batch_size_bucket{le="50.0",queue="idle"} 0.0
jobd_claim_batch_size_bucket{le="100.0",queue="idle"} 0.0
jobd_claim_batch_size_bucket{le="200.0",queue="idle"} 0.0
jobd_claim_batch_size_bucket{le="500.0",queue="idle"} 0.0
jobd_claim_batch_size_bucket{le="1000.0",queue="idle"} 0.0
jobd_claim_batch_size_bucket{le="2000.0",queue="idle"} 0.0
jobd_claim_batch_size_bucket{le="+Inf",queue="idle"} 0.0
jobd_claim_batch_size_count{queue="idle"} 0.0
jobd_claim_batch_size_sum{queue="idle"} 0.0
"""


def hot_lines(body: bytes) -> str:
    return "".join(line + "\n" for line in body.decode().splitlines()
                   if line.removeprefix("# HELP ").removeprefix("# TYPE ").startswith(HOT))


def test_hot_metrics_exposition_is_exactly_what_it_was():
    metrics = make()
    metrics.init_queues(["default", "idle"])  # idle: a claim-batch histogram of zeros
    o = metrics.observer
    o.jobs_enqueued("default", "k", 3)
    o.job_started("default", "k", 0.0)
    o.job_started("default", "k", 0.25)  # on a bound: counted in le="0.25"
    o.job_started("default", "k", -2.0)  # clock skew: counted as 0
    o.job_finished("default", "k", "completed", 0.01)  # on the lowest bound
    o.job_finished("default", "k", "failed", 1e300)  # past every bound: +Inf only
    o.job_finished("default", "k", "released", 5.0)  # counted, not timed
    o.jobs_rescued("default", "k", 2)
    o.error_classified("default", "network")
    o.claim_batch("default", 200)
    o.claim_batch("default", 0)
    o.db_round_trip("claim", 0.0005)
    o.db_round_trip("claim", 7.5)
    assert hot_lines(metrics.exposition()[0]) == HOT_EXPOSITION


class Reference:
    """The hot metrics as prometheus_client's Counter and Histogram, fed like the old hooks."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.enqueued = Counter("jobd_jobs_enqueued", "Jobs created through the control API.",
                                ["queue", "kind"], registry=r)
        self.started = Counter("jobd_jobs_started", "Attempts started.", ["queue", "kind"],
                               registry=r)
        self.finished = Counter(
            "jobd_jobs_finished",
            "Attempts ended, by outcome (completed, failed, retried, cancelled, timed_out, "
            "rescued, released).", ["queue", "kind", "outcome"], registry=r)
        self.errors = Counter("jobd_job_errors", "Attempts that raised, by error class.",
                              ["queue", "error_class"], registry=r)
        self.run = Histogram("jobd_job_run_seconds", "Attempt run time.", ["queue", "kind"],
                             buckets=JOB_BUCKETS, registry=r)
        self.wait = Histogram("jobd_job_wait_seconds",
                              "Time from a job's run_at to its attempt's start.",
                              ["queue", "kind"], buckets=JOB_BUCKETS, registry=r)
        self.db = Histogram("jobd_db_round_trip_seconds",
                            "Store call time, trio to Postgres and back.", ["operation"],
                            buckets=DB_BUCKETS, registry=r)
        self.batch = Histogram("jobd_claim_batch_size", "Jobs per non-empty claim.", ["queue"],
                               buckets=BATCH_BUCKETS, registry=r)


def test_hot_metrics_export_what_prometheus_client_would():
    rng = random.Random(20240611)
    metrics, ref = make(), Reference()
    o = metrics.observer
    metrics.init_queues(["q0", "q9"])
    for queue in ("q0", "q9"):
        ref.batch.labels(queue)

    def seconds(bounds: tuple[float, ...]) -> float:
        pick = rng.random()
        if pick < 0.3:
            return float(rng.choice(bounds))  # exactly on a bound
        if pick < 0.4:
            return rng.choice([0.0, -rng.random(), 1e12, bounds[-1] * 1.0000001])
        return rng.uniform(0, bounds[-1] * 1.2)

    for _ in range(3000):
        queue, kind = f"q{rng.randrange(3)}", f"k{rng.randrange(3)}"
        event = rng.randrange(7)
        if event == 0:
            n = rng.randrange(1, 50)
            o.jobs_enqueued(queue, kind, n)
            ref.enqueued.labels(queue, kind).inc(n)
        elif event == 1:
            wait = seconds(JOB_BUCKETS)
            o.job_started(queue, kind, wait)
            ref.started.labels(queue, kind).inc()
            ref.wait.labels(queue, kind).observe(max(wait, 0.0))
        elif event == 2:
            outcome, run = rng.choice(OUTCOMES), seconds(JOB_BUCKETS)
            o.job_finished(queue, kind, outcome, run)
            ref.finished.labels(queue, kind, outcome).inc()
            if outcome != "released":
                ref.run.labels(queue, kind).observe(max(run, 0.0))
        elif event == 3:
            o.jobs_rescued(queue, kind, 2)
            ref.finished.labels(queue, kind, "rescued").inc(2)
        elif event == 4:
            error_class = rng.choice(["network", "timeout", "unknown"])
            o.error_classified(queue, error_class)
            ref.errors.labels(queue, error_class).inc()
        elif event == 5:
            size = rng.choice([*BATCH_BUCKETS, 1, 3, 150, 4000])
            o.claim_batch(queue, size)
            ref.batch.labels(queue).observe(size)
        else:
            operation, took = rng.choice(["claim", "finish", "other"]), seconds(DB_BUCKETS)
            o.db_round_trip(operation, took)
            ref.db.labels(operation).observe(took)
    assert hot_lines(metrics.exposition()[0]) == hot_lines(generate_latest(ref.registry))
    ours = metrics.exposition("application/openmetrics-text; version=1.0.0")[0]
    assert hot_lines(ours) == hot_lines(generate_openmetrics(ref.registry))


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
        metrics.observer.key_paused("crawl", key)
    assert samples(metrics, "jobd_key_pauses_total") == {
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
    o.key_paused("default", "acme")
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


async def test_the_leader_lock_is_one_per_database_and_dies_with_its_session(store):
    async with store.metrics_session() as first:
        async with store.metrics_session() as second:
            assert await first.try_lead() is True
            assert await second.try_lead() is False
            await first.ping()
        async with store.metrics_session() as third:
            assert await third.try_lead() is False
    # The leader's connection closed, and its session lock went with it (once the
    # server's backend has noticed: poll briefly).
    async with store.metrics_session() as fourth:
        with trio.fail_after(10):
            while not await fourth.try_lead():  # noqa: ASYNC110 - polling the server
                await trio.sleep(0.02)


def peer(store, name: str) -> tuple[Peer, Leadership]:
    leadership: Leadership = Leadership()
    return Peer(Mailbox(name), store.metrics_session, leadership, interval_s=0.05,
                clock=TrioClock()), leadership


async def test_run_queue_gauges_refreshes_on_the_leader_only(store):
    await store.enqueue_many([NewJob(kind="k")])
    leader, follower = make(), make()
    keys: list[list[dict]] = []
    async with trio.open_nursery() as nursery:
        first, leads = peer(store, "peer-1")
        await nursery.start(first.run)
        await nursery.start(lambda task_status: run_queue_gauges(
            leads, leader, interval_s=0.05, clock=TrioClock(), key_gauges=keys.append,
            task_status=task_status))
        with trio.fail_after(10):
            while not samples(leader, "jobd_queue_jobs"):  # noqa: ASYNC110 - its next tick
                await trio.sleep(0.02)
        second, follows = peer(store, "peer-2")
        await nursery.start(second.run)
        await nursery.start(lambda task_status: run_queue_gauges(
            follows, follower, interval_s=0.05, clock=TrioClock(), task_status=task_status))
        # Two checks of its own, each answered "not leading": the follower had its chance.
        assert await second.mailbox.ask(Check()) is False
        assert await second.mailbox.ask(Check()) is False
        assert samples(follower, "jobd_metrics_leader") == {(): 0}
        assert samples(follower, "jobd_queue_jobs") == {}
        assert samples(leader, "jobd_metrics_leader") == {(): 1}
        assert samples(leader, "jobd_queue_jobs")[(("queue", "default"), ("state", "available"))] == 1
        assert keys  # the per-key rows came along on the leader's session
        nursery.cancel_scope.cancel()
    assert samples(leader, "jobd_metrics_leader") == {(): 0}


async def test_the_gauges_move_when_the_leader_loses_its_connection(store):
    await store.enqueue_many([NewJob(kind="k")])
    leader, follower = make(), make()
    async with trio.open_nursery() as nursery:
        first, leads = peer(store, "peer-1")
        await nursery.start(first.run)
        await leads.wait(True)
        await nursery.start(lambda task_status: run_queue_gauges(
            leads, leader, interval_s=0.05, clock=TrioClock(), task_status=task_status))
        second, follows = peer(store, "peer-2")
        await nursery.start(second.run)
        await nursery.start(lambda task_status: run_queue_gauges(
            follows, follower, interval_s=0.05, clock=TrioClock(), task_status=task_status))
        assert await second.mailbox.ask(Check()) is False
        pid = await leader_pid(store)
        async with store.transaction() as tx:
            assert await tx.fetchval("SELECT pg_terminate_backend($1)", pid) is True
        with trio.fail_after(10):
            await follows.wait(True)
            while not samples(follower, "jobd_queue_jobs"):  # noqa: ASYNC110 - its next tick
                await trio.sleep(0.02)
        with trio.fail_after(10):
            await leads.wait(False)
        assert samples(leader, "jobd_metrics_leader") == {(): 0}
        assert samples(leader, "jobd_queue_jobs") == {}
        nursery.cancel_scope.cancel()


def test_loop_lag_and_blocked_handlers_are_exported():
    metrics = make()
    metrics.loop_lag.observe((), 0.3)
    metrics.loop_blocks.inc(("slow.kind",))
    body = metrics.exposition()[0].decode()
    assert 'jobd_event_loop_lag_seconds_bucket{le="0.5"} 1.0' in body
    assert 'jobd_event_loop_blocks_total{kind="slow.kind"} 1.0' in body
