"""A flow key as `jobctl stats` shows it: its row from the store read against the limits
its queue is configured with (the effective rate, whether the breaker is open).

Apart from `control` because the leader's key gauges read keys the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from actors.flow import BREAKER_COOLDOWN_S, FlowLimits
from protocol.jobs import KeyStats


def key_stats(row: dict[str, Any], limits: FlowLimits) -> KeyStats:
    """A key's row from the store, read against the queue's configured limits."""
    lim = limits.for_key(row["key"])
    rate = lim.rate
    factor = row["rate_factor"] if lim.adaptive else 1.0
    breaker = "closed"
    threshold = lim.breaker_failures
    now = datetime.now(UTC)
    if threshold is not None and row["consecutive_failures"] >= threshold:
        cooldown = lim.breaker_cooldown_s
        reopens = row["last_failure_at"] + timedelta(
            seconds=BREAKER_COOLDOWN_S if cooldown is None else cooldown)
        breaker = "open" if now < reopens else "half_open"
    paused = row["paused_until"] if row["paused_until"] and row["paused_until"] > now else None
    return KeyStats(
        queue=row["queue"], key=row["key"], running=row["running"], queued=row["queued"],
        concurrency_limit=lim.concurrency, rate_limit=rate,
        effective_rate=rate * factor if rate is not None else None,
        tokens_per_minute=lim.tpm, paused_until=paused, breaker=breaker,
        consecutive_failures=row["consecutive_failures"],
    )
