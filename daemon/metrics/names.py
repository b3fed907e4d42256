"""The fixed vocabulary of jobd's metrics: bucket bounds, label values, the key bound.

Kept apart from the registry so the tests, the observer and the collectors name the
same buckets and states without importing each other.
"""

from __future__ import annotations

from collections.abc import Iterable

JOB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
               900, 1800, 3600, 7200)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
WEBHOOK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# An HTTP handler's request, from sending it to its answer read (or its failure).
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# jobd_http_requests_total{outcome}: what the answer (or its absence) meant.
HTTP_OUTCOMES = ("completed", "callback", "rate_limited", "network", "failed",
                 "result_too_large", "timeout", "connection_error", "refused", "cancelled")

OUTCOMES = ("completed", "failed", "retried", "cancelled", "timed_out", "rescued", "released")
# skipped: enqueues a flow-control tool refused, from every path (SQL and events too).
GAUGE_STATES = ("scheduled", "available", "running", "completed", "failed", "cancelled",
                "skipped")
# Flow-control tools: enqueue_tools outcomes counted as skipped or collapsed, by label.
SKIPPED_REASONS = {"skipped_throttle": "throttle", "skipped_singleton": "singleton"}
COLLAPSED_TOOLS = {"debounced": "debounce", "replaced": "unique_replace"}
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
WEBHOOK_OUTCOMES = ("delivered", "failed")  # jobd_webhook_deliveries_total{outcome}
OTHER_KEY = "_other"  # where keys past the per-queue series limit are counted


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
