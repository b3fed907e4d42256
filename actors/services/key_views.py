"""A flow key as `jobctl stats` shows it: its row from the store read against the limits
its queue is configured with (the effective rate, whether the breaker is open).

Apart from `control` because the daemon reads limits the same way (the breaker
threshold of a key, the keys of the leader's gauges).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from protocol.jobs import KeyStats


def limits_for_key(limits: dict[str, Any], key: str) -> dict[str, Any]:
    """One key's limits: the queue's defaults with that key's overrides on top."""
    return {**limits.get("default", {}), **limits.get("keys", {}).get(key, {})}


def key_stats(row: dict[str, Any], limits: dict[str, Any]) -> KeyStats:
    """A key's row from the store, read against the queue's configured limits."""
    lim = limits_for_key(limits, row["key"])
    rate = lim.get("rate")
    factor = row["rate_factor"] if lim.get("adaptive") else 1.0
    breaker = "closed"
    threshold = lim.get("breaker_failures")
    now = datetime.now(UTC)
    if threshold is not None and row["consecutive_failures"] >= threshold:
        reopens = row["last_failure_at"] + timedelta(seconds=lim.get("breaker_cooldown_s", 30))
        breaker = "open" if now < reopens else "half_open"
    paused = row["paused_until"] if row["paused_until"] and row["paused_until"] > now else None
    return KeyStats(
        queue=row["queue"], key=row["key"], running=row["running"], queued=row["queued"],
        concurrency_limit=lim.get("concurrency"), rate_limit=rate,
        effective_rate=rate * factor if rate is not None else None,
        tokens_per_minute=lim.get("tpm"), paused_until=paused, breaker=breaker,
        consecutive_failures=row["consecutive_failures"],
    )
