"""`Metrics`: one registry per daemon, and every `jobd_*` metric defined on it.

Each metric's name, help text, labels and buckets are written here once, in the order
the exposition lists them; dashboards and alerts (deploy/) depend on these names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from daemon.metrics.accumulators import Counter, Histogram
from daemon.metrics.collectors import LiveCollector, Mailboxes, QueueGaugeCollector
from daemon.metrics.names import (
    BATCH_BUCKETS,
    BATCH_SIZE_BUCKETS,
    DB_BUCKETS,
    HTTP_BUCKETS,
    JOB_BUCKETS,
    LAG_BUCKETS,
    KeyLabels,
)
from daemon.metrics.observer import PromObserver
from daemon.metrics.webhooks import WebhookMetrics

# `*_created` series double every counter and histogram in the text format and no
# dashboard or alert of ours reads them. The switch is process-wide; the daemon owns
# its process.
prometheus_client.disable_created_metrics()


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
        self.key_pauses = Counter("jobd_key_pauses", "Times a key was paused.",
                                  ["queue", "key"], registry=r)
        self.breaker_openings = Counter("jobd_breaker_openings",
                                        "Times a key's circuit breaker opened.",
                                        ["queue", "key"], registry=r)
        self.actor_restarts = Counter("jobd_actor_restarts",
                                      "Actor restarts by their supervisor.", ["actor"],
                                      registry=r)
        self.maintenance_errors = Counter(
            "jobd_maintenance_errors", "Reaper statements and schedules skipped because "
            "Postgres refused a value or a stored row is out of range, by actor and step.",
            ["actor", "step"], registry=r)
        self.http_errors = Counter(
            "jobd_http_errors", "HTTP connections refused or cut and requests failed, by "
            "reason (connection_limit, accept_error, read_timeout, write_timeout, too_large, "
            "internal).", ["reason"], registry=r)
        self.notifications_dropped = Counter(
            "jobd_notifications_dropped",
            "LISTEN notifications dropped for a malformed payload or a full buffer.", ["channel"], registry=r)
        self.control_dropped = Counter(
            "jobd_control_connections_dropped",
            "Control socket connections ended by jobd or lost, by reason (hung_up, "
            "send_timeout, frame_too_long, too_many_connections, handshake_timeout, "
            "idle_timeout, accept_failed, error).", ["reason"], registry=r)
        self.loop_errors = Counter("jobd_asyncio_errors",
                                   "Errors the asyncio loop reported with nobody awaiting "
                                   "them (logged, not raised).", [], registry=r)
        self.events_received = Counter(
            "jobd_events_received", "Events sent through the control API and stored (an "
            "event sent from SQL is not counted here).", [], registry=r)
        self.events_deduplicated = Counter(
            "jobd_events_deduplicated", "Sends answered with an earlier event: a repeat of "
            "its idempotency key within events.dedup_window.", [], registry=r)
        self.event_jobs_started = Counter(
            "jobd_event_jobs_started", "Jobs created by events sent through the control "
            "API, by kind.", ["kind"], registry=r)
        self.run_seconds = Histogram("jobd_job_run_seconds", "Attempt run time.",
                                     ["queue", "kind"], buckets=JOB_BUCKETS, registry=r)
        self.wait_seconds = Histogram("jobd_job_wait_seconds",
                                      "Time from a job's run_at to its attempt's start.",
                                      ["queue", "kind"], buckets=JOB_BUCKETS, registry=r)
        self.db_seconds = Histogram("jobd_db_round_trip_seconds",
                                    "Store call time, trio to Postgres and back.",
                                    ["operation"], buckets=DB_BUCKETS, registry=r)
        self.claim_batch = Histogram("jobd_claim_batch_size", "Jobs per non-empty claim.",
                                     ["queue"], buckets=BATCH_BUCKETS, registry=r)
        self.jobs_skipped = Counter(
            "jobd_jobs_skipped", "Enqueues a flow-control tool recorded as `skipped`, by "
            "reason (throttle: mode drop; singleton: mode skip).", ["kind", "reason"], registry=r)
        self.enqueues_collapsed = Counter(
            "jobd_enqueues_collapsed", "Enqueues folded into a job already queued, by tool "
            "(debounce; unique_replace: unique_mode replace).", ["kind", "tool"], registry=r)
        self.batch_size = Histogram(
            "jobd_batch_size", "Items per batch job, observed at its first attempt "
            "(the count is the batches started).", ["kind"], buckets=BATCH_SIZE_BUCKETS,
            registry=r)
        self.loop_lag = Histogram("jobd_event_loop_lag_seconds",
                                  "How late the event loop woke a probe sleeping 0.5 s.",
                                  [], buckets=LAG_BUCKETS, registry=r)
        self.loop_blocks = Counter("jobd_event_loop_blocks",
                                   "Task steps that held the event loop past "
                                   "daemon.loop_lag_warning, by the handler kind running "
                                   "(\"\" when no handler).", ["kind"], registry=r)
        self.http_requests = Counter(
            "jobd_http_requests", "Requests to HTTP handlers' endpoints, by kind, status "
            "class (2xx..5xx, none: no answer) and what the answer meant.",
            ["kind", "status_class", "outcome"], registry=r)
        self.http_seconds = Histogram("jobd_http_request_seconds",
                                      "An HTTP handler's request, sent to answered.",
                                      ["kind"], buckets=HTTP_BUCKETS, registry=r)
        info = Gauge("jobd_daemon_info", "Always 1; labels name this daemon.",
                     ["version", "region", "daemon_id"], registry=r)
        info.labels(version, region, daemon_id).set(1)

        self.keys = KeyLabels(key_series_limit, keys)
        self.live = LiveCollector(running, mailboxes, ready)
        r.register(self.live)
        self.queue_gauges = QueueGaugeCollector()
        r.register(self.queue_gauges)
        self.webhooks = WebhookMetrics(r)
        self.observer = PromObserver(
            enqueued=self.enqueued, started=self.started, finished=self.finished,
            errors=self.errors, actor_restarts=self.actor_restarts,
            maintenance_errors=self.maintenance_errors, loop_errors=self.loop_errors,
            key_pauses=self.key_pauses, breaker_openings=self.breaker_openings,
            notifications_dropped=self.notifications_dropped,
            run_seconds=self.run_seconds, wait_seconds=self.wait_seconds,
            db_seconds=self.db_seconds, claim_batch=self.claim_batch,
            jobs_skipped=self.jobs_skipped, enqueues_collapsed=self.enqueues_collapsed,
            batch_size=self.batch_size,
            keys=self.keys, live=self.live, events_received=self.events_received,
            events_deduplicated=self.events_deduplicated,
            event_jobs_started=self.event_jobs_started,
            http_requests=self.http_requests, http_seconds=self.http_seconds)

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
