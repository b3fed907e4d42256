"""The completion webhooks' metrics: deliveries by outcome, retries by reason, request
time, and the backlog (pending rows, the oldest one's age) per webhook.

The backlog describes the database, and every daemon declaring a webhook exports the
same value for it: dashboards and alerts take `max by (webhook)`, never `sum`. A
webhook's series exist from the start (zeros), so `rate()` and alerts work at once.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon.metrics.accumulators import Counter, Histogram
from daemon.metrics.names import WEBHOOK_BUCKETS, WEBHOOK_OUTCOMES
from daemon.metrics.observer import Drops


class WebhookMetrics(Collector):
    """Implements `actors.ports.WebhookObserver`; registers its metrics on `registry`."""

    def __init__(self, registry: CollectorRegistry, drops: Drops | None = None):
        self.deliveries = Counter(
            "jobd_webhook_deliveries", "Webhook outbox rows finished, by webhook and outcome "
            "(delivered: a 2xx; failed: the retry window ran out).", ["webhook", "outcome"],
            registry=registry)
        self.retries = Counter(
            "jobd_webhook_retries", "Webhook attempts that will be retried, by reason "
            "(status_4xx, status_5xx, status_3xx, timeout, network).", ["webhook", "reason"],
            registry=registry)
        self.seconds = Histogram("jobd_webhook_request_seconds", "Webhook request time.",
                                 ["webhook"], buckets=WEBHOOK_BUCKETS, registry=registry)
        self.backlog: dict[str, tuple[int, float]] = {}
        self.drops = drops or Drops()
        registry.register(self)

    def declare(self, webhooks: Iterable[str]) -> None:
        for name in webhooks:
            for outcome in WEBHOOK_OUTCOMES:
                self.deliveries.ensure((name, outcome))
            self.seconds.ensure((name,))

    def webhook_attempt(self, webhook: str, state: str, reason: str, seconds: float) -> None:
        try:
            self.seconds.observe((webhook,), max(seconds, 0.0))
            if state == "pending":
                self.retries.inc((webhook, reason))
            else:
                self.deliveries.inc((webhook, state))
        except Exception:  # noqa: BLE001 - observation must never break a delivery
            self.drops.dropped("webhook_attempt")

    def webhook_backlog(self, backlog: dict[str, tuple[int, float]]) -> None:
        self.backlog = dict(backlog)

    # -- the scrape -------------------------------------------------------------------

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> list[GaugeMetricFamily]:
        return list(self._families())

    def _families(self) -> Iterable[GaugeMetricFamily]:
        pending = GaugeMetricFamily("jobd_webhook_pending",
                                    "Webhook outbox rows not yet delivered or failed.",
                                    labels=["webhook"])
        oldest = GaugeMetricFamily("jobd_webhook_oldest_pending_age_seconds",
                                   "Age of the oldest pending webhook outbox row (0: none).",
                                   labels=["webhook"])
        for name, (count, age) in sorted(self.backlog.items()):
            pending.add_metric([name], count)
            oldest.add_metric([name], age if count else 0.0)
        yield pending
        yield oldest
