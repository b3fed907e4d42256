"""Every `jobd_*` metric, on one registry per daemon, and the Observer that feeds them.

Three kinds of source, three ways in:

- events (a job started, finished, errored; an actor restarted) come through
  `PromObserver`, which implements `actors.ports.Observer`; each hook is a dict lookup
  and an increment on a plain-Python accumulator (`_Counter`, `_Histogram`), and never
  raises. The hooks run several times per job, so they skip prometheus_client's Counter
  and Histogram (a lock and a label tuple per `labels()`, a lock and a walk over the
  buckets per `observe()`): hooks and scrapes all run on the daemon's one trio thread,
  and the accumulators become metric families, exported as those classes would export
  them, only at scrape time;
- this daemon's live state (running jobs, mailbox depths, readiness) is read by a
  collector at scrape time from callables the daemon hands in: cheap, always fresh;
- database-derived gauges (`jobd_queue_jobs`, `jobd_queue_oldest_available_age_seconds`)
  are computed off the scrape path by `run_queue_gauges`, on ONE daemon per database.

Leader election for the database gauges: each daemon keeps one dedicated connection and
asks `pg_try_advisory_lock` on it every interval until it wins; the winner keeps the
session lock (and leadership) until that connection ends, so exactly one daemon
exports the gauges and `sum()` over instances never double counts. A transaction-level
lock would not do: it is released when the gauge query commits, so a daemon asking a
moment later wins too, every daemon ends up refreshing and exporting values of
different ages. When the leader dies or loses its connection Postgres drops the lock
and another daemon takes over within one interval. A non-leader exports no samples for
these gauges; `jobd_metrics_leader` says who leads.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from actors.ports import StoreUnavailable
from actors.runtime.clock import Clock

log = logging.getLogger("jobd.metrics")

# `*_created` series double every counter and histogram in the text format and no
# dashboard or alert of ours reads them. The switch is process-wide; the daemon owns
# its process.
prometheus_client.disable_created_metrics()

JOB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
               900, 1800, 3600, 7200)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

OUTCOMES = ("completed", "failed", "retried", "cancelled", "timed_out", "rescued", "released")
GAUGE_STATES = ("scheduled", "available", "running", "completed", "failed", "cancelled")
OTHER_KEY = "_other"  # where keys past the per-queue series limit are counted


class Mailboxes(Protocol):
    """What the mailbox gauge needs from `actors.registry.Registry`."""

    def names(self) -> list[str]: ...
    def lookup(self, name: str) -> Any: ...


class Metrics:
    """The registry and every metric on it; one per daemon (tests build their own)."""

    def __init__(
        self,
        *,
        version: str,
        region: str,
        daemon_id: str,
        running: Callable[[], dict[str, tuple[int, int]]] = dict,
        mailboxes: Mailboxes | None = None,
        ready: Callable[[], bool] = lambda: False,
        key_series_limit: int = 50,
        keys: Iterable[str] = (),
    ):
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry

        # Registered in this order, so the exposition lists them in this order.
        self.enqueued = _Counter("jobd_jobs_enqueued", "Jobs created through the control API.",
                                 ["queue", "kind"], registry=r)
        self.started = _Counter("jobd_jobs_started", "Attempts started.", ["queue", "kind"],
                                registry=r)
        self.finished = _Counter(
            "jobd_jobs_finished",
            "Attempts ended, by outcome (completed, failed, retried, cancelled, timed_out, "
            "rescued, released).", ["queue", "kind", "outcome"], registry=r)
        self.errors = _Counter("jobd_job_errors", "Attempts that raised, by error class.",
                               ["queue", "error_class"], registry=r)
        self.rate_limit_waits = _Counter("jobd_rate_limit_waits",
                                         "Claims held back by a key's rate limit.",
                                         ["queue", "key"], registry=r)
        self.key_pauses = _Counter("jobd_key_pauses", "Times a key was paused.",
                                   ["queue", "key"], registry=r)
        self.breaker_openings = _Counter("jobd_breaker_openings",
                                         "Times a key's circuit breaker opened.",
                                         ["queue", "key"], registry=r)
        self.actor_restarts = _Counter("jobd_actor_restarts",
                                       "Actor restarts by their supervisor.", ["actor"],
                                       registry=r)
        self.maintenance_errors = _Counter(
            "jobd_maintenance_errors", "Reaper statements and schedules skipped because "
            "Postgres refused a value or a stored row is out of range, by actor and step.",
            ["actor", "step"], registry=r)
        self.http_errors = _Counter(
            "jobd_http_errors", "HTTP connections refused or cut and requests failed, by "
            "reason (connection_limit, accept_error, read_timeout, write_timeout, too_large, "
            "internal).", ["reason"], registry=r)
        self.notifications_dropped = _Counter(
            "jobd_notifications_dropped",
            "LISTEN notifications dropped for a malformed payload or a full buffer.", ["channel"], registry=r)
        self.control_dropped = _Counter(
            "jobd_control_connections_dropped",
            "Control socket connections ended by jobd or lost, by reason (hung_up, "
            "send_timeout, frame_too_long, too_many_connections, handshake_timeout, "
            "idle_timeout, accept_failed, error).", ["reason"], registry=r)
        self.loop_errors = _Counter("jobd_asyncio_errors",
                                    "Errors the asyncio loop reported with nobody awaiting "
                                    "them (logged, not raised).", [], registry=r)
        self.run_seconds = _Histogram("jobd_job_run_seconds", "Attempt run time.",
                                      ["queue", "kind"], buckets=JOB_BUCKETS, registry=r)
        self.wait_seconds = _Histogram("jobd_job_wait_seconds",
                                       "Time from a job's run_at to its attempt's start.",
                                       ["queue", "kind"], buckets=JOB_BUCKETS, registry=r)
        self.db_seconds = _Histogram("jobd_db_round_trip_seconds",
                                     "Store call time, trio to Postgres and back.",
                                     ["operation"], buckets=DB_BUCKETS, registry=r)
        self.claim_batch = _Histogram("jobd_claim_batch_size", "Jobs per non-empty claim.",
                                      ["queue"], buckets=BATCH_BUCKETS, registry=r)
        self.loop_lag = _Histogram("jobd_event_loop_lag_seconds",
                                   "How late the event loop woke a probe sleeping 0.5 s.",
                                   [], buckets=LAG_BUCKETS, registry=r)
        self.loop_blocks = _Counter("jobd_event_loop_blocks",
                                    "Task steps that held the event loop past "
                                    "daemon.loop_lag_warning, by the handler kind running "
                                    "(\"\" when no handler).", ["kind"], registry=r)
        info = Gauge("jobd_daemon_info", "Always 1; labels name this daemon.",
                     ["version", "region", "daemon_id"], registry=r)
        info.labels(version, region, daemon_id).set(1)

        self.keys = KeyLabels(key_series_limit, keys)
        self.live = _LiveCollector(running, mailboxes, ready)
        r.register(self.live)
        self.queue_gauges = _QueueGaugeCollector()
        r.register(self.queue_gauges)
        self.observer = PromObserver(self)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type) for a scrape; OpenMetrics if the scraper asks for it."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def init_queues(self, queues: Iterable[str]) -> None:
        """Known queues export zeros from the start, so rate() and absent() work at once."""
        for queue in queues:
            self.claim_batch.ensure((queue,))
            self.live.queues.add(queue)
            self.queue_gauges.queues.add(queue)


class _Family(Collector):
    """What _Counter and _Histogram share: a name, help, label names, a registry."""

    family: type[CounterMetricFamily] | type[HistogramMetricFamily]

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        registry.register(self)  # last: the registry describes us right away

    def _empty(self) -> Any:
        return self.family(self.name, self.documentation, labels=self.labelnames)

    def describe(self) -> list[Any]:
        return [self._empty()]


class _Counter(_Family):
    """A labelled counter for one thread: label-value tuple -> value, a family at scrape.

    Exported exactly as prometheus_client's `Counter` exports it (`<name>_total` per
    label set, in first-seen order; no `_created`, which is disabled process-wide).
    """

    family = CounterMetricFamily

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *,
                 registry: CollectorRegistry):
        self.values: dict[tuple[str, ...], float] = {}
        super().__init__(name, documentation, labelnames, registry)

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        """Add `amount` to the series `key` (label values in `labelnames` order)."""
        if not amount >= 0:  # negative or NaN: a counter never goes down
            raise ValueError(f"counter {self.name} cannot add {amount!r}")
        values = self.values
        try:
            values[key] += amount
        except KeyError:
            values[self.ensure(key)] += amount

    def ensure(self, key: tuple[str, ...]) -> tuple[str, ...]:
        """Make the series exist (with 0); return its key, label values made str."""
        key = _label_values(self.name, self.labelnames, key)
        self.values.setdefault(key, 0.0)
        return key

    def collect(self) -> list[CounterMetricFamily]:
        family = self._empty()
        for key, value in self.values.items():
            family.add_metric(key, value)
        return [family]


class _Histogram(_Family):
    """A labelled histogram for one thread: label-value tuple -> bucket counts and sum.

    Per series one list: a count per bucket (not cumulative; the last bucket is +Inf),
    then the sum. `bisect_left` finds the first bound >= the value, so a value equal to
    a bound lands in that bound's bucket, as `le` says. Exported exactly as
    prometheus_client's `Histogram` exports it: cumulative `_bucket{le=...}` with +Inf
    last, `_count`, `_sum`, per label set in first-seen order.
    """

    family = HistogramMetricFamily

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *,
                 buckets: Sequence[float], registry: CollectorRegistry):
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(set(bounds)) or not bounds or bounds[-1] == math.inf:
            raise ValueError(f"histogram {name}: bounds must be finite, increasing, unique")
        self.bounds = bounds
        self._le = tuple(floatToGoString(b) for b in bounds) + ("+Inf",)
        self.series: dict[tuple[str, ...], list[float]] = {}
        super().__init__(name, documentation, labelnames, registry)

    def observe(self, key: tuple[str, ...], value: float) -> None:
        """Count `value` into the series `key` (label values in `labelnames` order)."""
        if value != value:  # NaN: in no bucket, and it would make the sum NaN for good
            raise ValueError(f"histogram {self.name} cannot observe NaN")
        bucket = bisect_left(self.bounds, value)
        try:
            series = self.series[key]
        except KeyError:
            series = self.series[self.ensure(key)]
        series[-1] += value  # the sum first: a value that cannot be added changes nothing
        series[bucket] += 1

    def ensure(self, key: tuple[str, ...]) -> tuple[str, ...]:
        """Make the series exist (all zeros); return its key, label values made str."""
        key = _label_values(self.name, self.labelnames, key)
        if key not in self.series:
            self.series[key] = [0] * (len(self.bounds) + 1) + [0.0]
        return key

    def collect(self) -> list[HistogramMetricFamily]:
        family = self._empty()
        for key, series in self.series.items():
            total = 0
            buckets = []
            for le, n in zip(self._le, series[:-1], strict=True):  # [-1] is the sum
                total += n
                buckets.append((le, total))
            family.add_metric(key, buckets, series[-1])
        return [family]


def _label_values(name: str, labelnames: tuple[str, ...], key: tuple[Any, ...]) -> tuple[str, ...]:
    """`key` with every value a str (prometheus_client's `labels()` str()s them too).

    Only new series come here; a key with a non-str value is never stored as such, so
    it takes this path every time and still counts into its str() series.
    """
    if len(key) != len(labelnames):
        raise ValueError(f"{name}: {len(key)} label values for {labelnames}")
    return tuple(v if type(v) is str else str(v) for v in key)


class KeyLabels:
    """Bounds the `key` label: allow-listed keys, then the first `limit` per queue.

    Later keys share `key="_other"`; counters never forget a label, so first-come is
    the only bound that keeps them monotonic.
    """

    def __init__(self, limit: int, allow: Iterable[str] = ()):
        self.limit = limit
        self.allow = frozenset(allow)
        self._seen: dict[str, set[str]] = {}

    def __call__(self, queue: str, key: str) -> str:
        if key in self.allow:
            return key
        seen = self._seen.setdefault(queue, set())
        if key in seen:
            return key
        if len(seen) < self.limit:
            seen.add(key)
            return key
        return OTHER_KEY

    def top(self, queue: str, values: dict[str, float]) -> dict[str, float]:
        """For gauges: the allow-list plus the `limit` largest; the rest summed as _other."""
        ranked = sorted((k for k in values if k not in self.allow), key=values.__getitem__,
                        reverse=True)
        out = {k: v for k, v in values.items() if k in self.allow}
        out.update((k, values[k]) for k in ranked[: self.limit])
        rest = ranked[self.limit:]
        if rest:
            out[OTHER_KEY] = sum(values[k] for k in rest)
        return out


class PromObserver:
    """`actors.ports.Observer` over `Metrics`. Cheap; a bad value is dropped, never raised."""

    def __init__(self, metrics: Metrics):
        self._m = metrics
        # The hot hooks' accumulators, bound once: one attribute load each per call.
        self._started = metrics.started.inc
        self._wait = metrics.wait_seconds.observe
        self._finished = metrics.finished.inc
        self._run = metrics.run_seconds.observe

    def job_started(self, queue: str, kind: str, wait_s: float) -> None:
        try:
            key = (queue, kind)
            self._started(key)
            self._wait(key, 0.0 if wait_s < 0.0 else wait_s)
        except Exception:  # noqa: BLE001 - metrics must never break a job
            log.debug("metric dropped", exc_info=True)

    def job_finished(self, queue: str, kind: str, outcome: str, run_s: float) -> None:
        try:
            self._finished((queue, kind, outcome))
            if outcome != "released":  # an interrupted attempt says nothing about run time
                self._run((queue, kind), 0.0 if run_s < 0.0 else run_s)
        except Exception:  # noqa: BLE001
            log.debug("metric dropped", exc_info=True)

    def jobs_enqueued(self, queue: str, kind: str, n: int) -> None:
        try:
            self._m.enqueued.inc((queue, kind), n)
        except Exception:  # noqa: BLE001
            log.debug("metric dropped", exc_info=True)

    def jobs_rescued(self, queue: str, kind: str, n: int) -> None:
        try:
            self._m.finished.inc((queue, kind, "rescued"), n)
        except Exception:  # noqa: BLE001
            log.debug("metric dropped", exc_info=True)

    def error_classified(self, queue: str, error_class: str) -> None:
        try:
            self._m.errors.inc((queue, error_class))
        except Exception:  # noqa: BLE001
            log.debug("metric dropped", exc_info=True)

    def actor_restarted(self, actor: str) -> None:
        try:
            self._m.actor_restarts.inc((actor,))
        except Exception:  # noqa: BLE001
            log.debug("metric dropped", exc_info=True)

    def maintenance_error(self, actor: str, step: str) -> None:
        try:
            self._m.maintenance_errors.inc((actor, step))
        except Exception:  # noqa: BLE001
            log.debug("metric dropped", exc_info=True)

    def claim_batch(self, queue: str, size: int) -> None:
        try:
            self._m.claim_batch.observe((queue,), size)
        except Exception:  # noqa: BLE001
            log.debug("metric dropped", exc_info=True)

    def loop_error(self) -> None:
        try:
            self._m.loop_errors.inc(())
        except Exception:  # noqa: BLE001
            log.debug("metric dropped", exc_info=True)

    def db_round_trip(self, operation: str, seconds: float) -> None:
        try:
            self._m.db_seconds.observe((operation,), seconds)
        except Exception:  # noqa: BLE001
            log.debug("metric dropped", exc_info=True)

    def notification_dropped(self, channel: str) -> None:
        try:
            self._m.notifications_dropped.inc((channel,))
        except Exception:  # noqa: BLE001
            log.debug("metric dropped", exc_info=True)

    # -- flow control (not in the Observer Protocol until flow control lands) -----------

    def rate_limit_waited(self, queue: str, key: str) -> None:
        try:
            self._m.rate_limit_waits.inc((queue, self._m.keys(queue, key)))
        except Exception:  # noqa: BLE001
            log.debug("metric dropped", exc_info=True)

    def key_paused(self, queue: str, key: str) -> None:
        try:
            self._m.key_pauses.inc((queue, self._m.keys(queue, key)))
        except Exception:  # noqa: BLE001
            log.debug("metric dropped", exc_info=True)

    def breaker_opened(self, queue: str, key: str) -> None:
        try:
            self._m.breaker_openings.inc((queue, self._m.keys(queue, key)))
        except Exception:  # noqa: BLE001
            log.debug("metric dropped", exc_info=True)

    def key_snapshot(self, queue: str, running: dict[str, int], rate: dict[str, float],
                     breaker_open: dict[str, bool] | None = None) -> None:
        """Replace one queue's per-key gauges (bounded by `KeyLabels.top`)."""
        try:
            live = self._m.live
            live.key_running[queue] = self._m.keys.top(queue, dict(running))
            live.key_rate[queue] = self._m.keys.top(queue, dict(rate))
            opened = {k: float(v) for k, v in (breaker_open or {}).items()}
            live.key_breaker[queue] = self._m.keys.top(queue, opened)
        except Exception:  # noqa: BLE001
            log.debug("metric dropped", exc_info=True)


class _LiveCollector(Collector):
    """This daemon's state, read at scrape time (no I/O: a few dict reads)."""

    def __init__(self, running: Callable[[], dict[str, tuple[int, int]]],
                 mailboxes: Mailboxes | None, ready: Callable[[], bool]):
        self._running = running
        self._mailboxes = mailboxes
        self._ready = ready
        self.queues: set[str] = set()
        self.key_running: dict[str, dict[str, float]] = {}
        self.key_rate: dict[str, dict[str, float]] = {}
        self.key_breaker: dict[str, dict[str, float]] = {}

    def describe(self) -> list[GaugeMetricFamily]:
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("jobd_running_jobs", "Attempts running on this daemon.",
                              labels=["queue"]),
            GaugeMetricFamily("jobd_queue_concurrency",
                              "Configured concurrency per queue on this daemon.",
                              labels=["queue"]),
            GaugeMetricFamily("jobd_key_running_jobs",
                              "Attempts running on this daemon per key (top keys only).",
                              labels=["queue", "key"]),
            GaugeMetricFamily("jobd_key_effective_rate",
                              "Per-key claim rate allowed right now, per second (top keys only).",
                              labels=["queue", "key"]),
            GaugeMetricFamily("jobd_key_breaker_open",
                              "1 while a key's circuit breaker is open (top keys only; "
                              "_other counts open breakers).", labels=["queue", "key"]),
            GaugeMetricFamily("jobd_mailbox_messages", "Messages queued in an actor's mailbox.",
                              labels=["actor"]),
            GaugeMetricFamily("jobd_daemon_ready",
                              "1 when this daemon is ready (database healthy, not draining)."),
        ]

    def collect(self) -> list[GaugeMetricFamily]:
        running, limit, keys, rates, breakers, mailbox, ready = self._families()
        here = self._running()
        for queue in sorted(self.queues | set(here)):
            n, concurrency = here.get(queue, (0, 0))
            running.add_metric([queue], n)
            if queue in here:
                limit.add_metric([queue], concurrency)
        for family, source in ((keys, self.key_running), (rates, self.key_rate),
                               (breakers, self.key_breaker)):
            for queue, values in sorted(source.items()):
                for key, value in sorted(values.items()):
                    family.add_metric([queue, key], value)
        if self._mailboxes is not None:
            for name in self._mailboxes.names():
                try:
                    mailbox.add_metric([name], self._mailboxes.lookup(name).qsize())
                except KeyError:
                    continue  # unregistered between names() and lookup()
        ready.add_metric([], 1 if self._ready() else 0)
        return [running, limit, keys, rates, breakers, mailbox, ready]


class _QueueGaugeCollector(Collector):
    """The database-derived gauges, as last refreshed; empty unless this daemon leads."""

    def __init__(self) -> None:
        self.queues: set[str] = set()
        self.leader = False
        self.counts: dict[tuple[str, str], int] | None = None
        self.oldest: dict[str, float] = {}

    def describe(self) -> list[GaugeMetricFamily]:
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("jobd_queue_jobs",
                              "Jobs per queue and state in the database (leader only).",
                              labels=["queue", "state"]),
            GaugeMetricFamily("jobd_queue_oldest_available_age_seconds",
                              "Age of the oldest claimable job per queue; 0 if none "
                              "(leader only).", labels=["queue"]),
            GaugeMetricFamily("jobd_metrics_leader",
                              "1 on the daemon that computes the database-derived gauges."),
        ]

    def collect(self) -> list[GaugeMetricFamily]:
        jobs, oldest, leader = self._families()
        leader.add_metric([], 1 if self.leader else 0)
        if self.leader and self.counts is not None:
            queues = sorted(self.queues | {q for q, _ in self.counts})
            for queue in queues:
                for state in GAUGE_STATES:
                    jobs.add_metric([queue, state], self.counts.get((queue, state), 0))
                oldest.add_metric([queue], self.oldest.get(queue, 0.0))
        return [jobs, oldest, leader]

    def update(self, counts: list[tuple[str, str, int]], oldest: list[tuple[str, float]]) -> None:
        self.counts = {(q, s): n for q, s, n in counts}
        self.oldest = {q: max(age, 0.0) for q, age in oldest if not math.isnan(age)}

    def clear(self) -> None:
        self.leader = False
        self.counts = None
        self.oldest = {}


class GaugeStore(Protocol):
    """What `run_queue_gauges` needs from `daemon.store.PgStore`."""

    def metrics_session(self) -> Any: ...


async def run_queue_gauges(
    store: GaugeStore,
    metrics: Metrics,
    *,
    interval_s: float,
    clock: Clock,
    key_gauges: Callable[[list[dict[str, Any]]], None] | None = None,
    key_limit: int = 200,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Try for leadership every interval; while leading, refresh the gauges every interval."""
    gauges = metrics.queue_gauges
    task_status.started()
    backoff = interval_s
    while True:
        try:
            async with store.metrics_session() as session:
                backoff = interval_s
                while True:
                    if not gauges.leader:
                        gauges.leader = await session.try_lead()
                        if gauges.leader:
                            log.info("this daemon now computes the queue gauges",
                                     extra={"event": "metrics.leader"})
                    if gauges.leader:
                        counts, oldest = await session.queue_gauges()
                        gauges.update(counts, oldest)
                        if key_gauges is not None:
                            key_gauges(await session.key_gauges(key_limit))
                    await clock.sleep(interval_s)
        except StoreUnavailable as exc:
            if gauges.leader:
                log.warning("queue gauges lost their connection: %s", exc,
                            extra={"event": "metrics.leader_lost"})
        except Exception:  # noqa: BLE001 - observation must never take the daemon down
            log.exception("refreshing the queue gauges failed", extra={"event": "metrics.failed"})
        finally:
            # Whatever ended the session ended the lock with it (or we are stopping).
            gauges.clear()
        await clock.sleep(backoff)
        backoff = min(backoff * 2, 10.0)  # after an outage the gauges come back soon
