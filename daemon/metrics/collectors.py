"""Gauges read at scrape time: this daemon's live state, and the leader's database gauges.

The live collector calls back into the daemon (running jobs, mailbox depths,
readiness): a few dict reads, no I/O, so every scrape is fresh. The queue-gauge
collector only holds what the gauges task (`daemon.metrics.gauges`) last computed,
and exports it only while this daemon leads, so `sum()` over daemons never counts a
database twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon.metrics.names import GAUGE_STATES


class Mailboxes(Protocol):
    """What the mailbox gauge needs from `actors.runtime.registry.Registry`."""

    def names(self) -> list[str]: ...
    def lookup(self, name: str) -> Any: ...


class LiveCollector(Collector):
    """This daemon's state, read at scrape time (no I/O: a few dict reads)."""

    def __init__(self, running: Callable[[], dict[str, tuple[int, int]]],
                 mailboxes: Mailboxes | None, ready: Callable[[], bool]):
        self._running = running
        self._mailboxes = mailboxes
        self._ready = ready
        self.queues: set[str] = set()
        # Replaced whole by the observer's key_snapshot, one queue at a time.
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


class QueueGaugeCollector(Collector):
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
