"""Plain-Python counters and histograms, turned into metric families only at scrape time.

The observer's hooks run several times per job, so they skip prometheus_client's
Counter and Histogram (a lock and a label tuple per `labels()`, a lock and a walk over
the buckets per `observe()`): hooks and scrapes all run on the daemon's one trio
thread, so a dict lookup and an increment are enough, and the families these classes
build at scrape time are exactly what prometheus_client's own classes would export.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class _Family(Collector):
    """What Counter and Histogram share: a name, help, label names, a registry."""

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


class Counter(_Family):
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


class Histogram(_Family):
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
            total: float = 0
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
