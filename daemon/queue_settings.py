"""What the config says about each queue, derived once (and again after a reload).

The finish path asks for a queue's flow limits on every batch, and each claim for its
recheck interval; reading them through here keeps the config's derivations in one
place and cached until a reload replaces the queues.
"""

from __future__ import annotations

from typing import Any

from actors.flow import FlowLimits
from actors.handlers import Handlers
from actors.ports import Observer
from actors.services.dispatcher import QueueSettings
from actors.services.key_views import key_stats
from actors.services.reaper import AgingRule
from daemon.config import Config, Queue
from protocol.jobs import KeyStats


def queue_names(config: Config, handlers: Handlers) -> list[str]:
    """Every queue served here: those handlers declare, those configured, and default."""
    declared = {d.queue for d in handlers.registered().values()}
    return sorted(declared | set(config.queues) | {"default"})


class QueueLimits:
    def __init__(self, config: Config):
        self._config = config
        self._limits: dict[str, FlowLimits | None] = {}
        self._timeouts: dict[str, float | None] = {}

    def forget(self) -> None:
        """The queues were reloaded: derive again on the next ask."""
        self._limits = {}
        self._timeouts = {}

    def limits_for(self, queue: str) -> FlowLimits | None:
        """A queue's flow limits (None: no flow control)."""
        if queue not in self._limits:
            self._limits[queue] = self._config.queue(queue).flow_limits()
        return self._limits[queue]

    def breaker_threshold(self, queue: str, key: str) -> int | None:
        limits = self.limits_for(queue)
        return limits.for_key(key).breaker_failures if limits is not None else None

    def timeout_s(self, queue: str) -> float | None:
        """`queues.<name>.timeout`: an attempt's timeout when its kind sets none."""
        if queue not in self._timeouts:
            timeout = self._config.queue(queue).timeout
            self._timeouts[queue] = timeout
        return self._timeouts[queue]

    def dispatcher_settings(self, queue: str) -> QueueSettings:
        qcfg = self._config.queue(queue)
        jobs = self._config.jobs
        return QueueSettings(queue=queue, concurrency=qcfg.concurrency,
                             claim_batch=qcfg.claim_batch, lease_s=jobs.lease,
                             poll_interval_s=jobs.poll_interval,
                             limits=self.limits_for(queue), recheck_s=_recheck_s(qcfg))

    def aging_rules(self) -> list[AgingRule]:
        return [AgingRule(name, q.aging, q.aging_floor)
                for name, q in self._config.queues.items() if q.aging is not None]

    def key_gauges(self, observer: Observer, rows: list[dict[str, Any]]) -> None:
        """Per-key running jobs, effective rate and breaker state, from the leader's query."""
        by_queue: dict[str, list[KeyStats]] = {}
        for row in rows:
            limits = self.limits_for(row["queue"])
            if limits is not None:
                by_queue.setdefault(row["queue"], []).append(key_stats(row, limits))
        for queue, stats in by_queue.items():
            observer.key_snapshot(
                queue, {k.key: k.running for k in stats},
                {k.key: k.effective_rate for k in stats if k.effective_rate is not None},
                {k.key: k.breaker != "closed" for k in stats})


def _recheck_s(queue: Queue) -> float | None:
    """A limited claim looks again after one token's time (bounded to 10 ms .. 1 s)."""
    if queue.flow_limits() is None:
        return None
    rate = queue.fastest_rate()
    return min(1.0, max(0.01, 1.0 / rate)) if rate else 0.25
