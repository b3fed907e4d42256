"""`PromObserver`: the `actors.ports.Observer` hooks, each an increment on an accumulator.

The hooks run inside the job path (several per attempt), so the one rule is that they
never raise and never block: every hook goes through `_never_raises`, which drops the
observation, counts the drop per hook and logs it at most once a minute per hook, with
the traceback of the first drop in that minute. A bad value (NaN, a negative count, an
unhashable label) is such a drop; the job it came from goes on.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Concatenate, ParamSpec

from daemon.metrics.accumulators import Counter, Histogram
from daemon.metrics.collectors import LiveCollector
from daemon.metrics.names import COLLAPSED_TOOLS, SKIPPED_REASONS, KeyLabels

log = logging.getLogger("jobd.metrics")

P = ParamSpec("P")

DROP_LOG_EVERY_S = 60.0


def _never_raises(
    hook: Callable[Concatenate[PromObserver, P], None],
) -> Callable[Concatenate[PromObserver, P], None]:
    """The hook, made to drop what it cannot count instead of raising into the caller."""
    site = hook.__name__

    @functools.wraps(hook)
    def guarded(self: PromObserver, *args: P.args, **kwargs: P.kwargs) -> None:
        try:
            hook(self, *args, **kwargs)
        except Exception:  # noqa: BLE001 - observation must never break a job
            self.drops.dropped(site)

    return guarded


class Drops:
    """Observations dropped, per hook; logs each hook's drops at most every `every_s`."""

    def __init__(self, every_s: float = DROP_LOG_EVERY_S,
                 now: Callable[[], float] = time.monotonic):
        self.counts: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}
        self._every_s = every_s
        self._now = now

    def dropped(self, site: str) -> None:
        """Count one drop at `site`; call it from the `except` that caught it."""
        n = self.counts[site] = self.counts.get(site, 0) + 1
        now = self._now()
        last = self._logged_at.get(site)
        if last is not None and now - last < self._every_s:
            return
        self._logged_at[site] = now
        log.warning("metrics: %s dropped an observation (%d so far)", site, n, exc_info=True,
                    extra={"event": "metrics.dropped", "hook": site, "dropped": n})


class PromObserver:
    """`actors.ports.Observer` over the accumulators it is handed. Cheap; never raises."""

    def __init__(
        self, *, enqueued: Counter, started: Counter, finished: Counter, errors: Counter,
        actor_restarts: Counter, maintenance_errors: Counter, loop_errors: Counter,
        key_pauses: Counter, breaker_openings: Counter, notifications_dropped: Counter, run_seconds: Histogram,
        wait_seconds: Histogram, db_seconds: Histogram, claim_batch: Histogram,
        jobs_skipped: Counter | None = None, enqueues_collapsed: Counter | None = None,
        batch_size: Histogram | None = None,
        keys: KeyLabels, live: LiveCollector, drops: Drops | None = None,
        events_received: Counter | None = None, events_deduplicated: Counter | None = None,
        event_jobs_started: Counter | None = None,
        http_requests: Counter | None = None, http_seconds: Histogram | None = None,
    ):
        self.drops = drops if drops is not None else Drops()
        self._keys = keys
        self._live = live
        # Bound once: one attribute load per call on the hot path.
        self._enqueued = enqueued.inc
        self._started = started.inc
        self._finished = finished.inc
        self._errors = errors.inc
        self._restarts = actor_restarts.inc
        self._maintenance = maintenance_errors.inc
        self._loop_errors = loop_errors.inc
        self._pauses = key_pauses.inc
        self._openings = breaker_openings.inc
        self._notifications_dropped = notifications_dropped.inc
        self._events = (events_received, events_deduplicated, event_jobs_started)
        self._http_requests = http_requests.inc if http_requests is not None else _ignore
        self._http_seconds = http_seconds.observe if http_seconds is not None else _ignore
        self._run = run_seconds.observe
        self._wait = wait_seconds.observe
        self._db = db_seconds.observe
        self._batch = claim_batch.observe
        self._skipped = jobs_skipped.inc if jobs_skipped is not None else _ignore
        self._collapsed = enqueues_collapsed.inc if enqueues_collapsed is not None else _ignore
        self._batch_size = batch_size.observe if batch_size is not None else _ignore

    @_never_raises
    def job_started(self, queue: str, kind: str, wait_s: float) -> None:
        key = (queue, kind)
        self._started(key)
        self._wait(key, 0.0 if wait_s < 0.0 else wait_s)

    @_never_raises
    def job_finished(self, queue: str, kind: str, outcome: str, run_s: float) -> None:
        self._finished((queue, kind, outcome))
        if outcome != "released":  # an interrupted attempt says nothing about run time
            self._run((queue, kind), 0.0 if run_s < 0.0 else run_s)

    @_never_raises
    def jobs_enqueued(self, queue: str, kind: str, n: int) -> None:
        self._enqueued((queue, kind), n)

    @_never_raises
    def events_sent(self, received: int, deduplicated: int, started: dict[str, int]) -> None:
        received_c, deduplicated_c, started_c = self._events
        if received_c is not None and received:
            received_c.inc((), received)
        if deduplicated_c is not None and deduplicated:
            deduplicated_c.inc((), deduplicated)
        if started_c is not None:
            for kind, n in started.items():
                started_c.inc((kind,), n)

    @_never_raises
    def flow_tool_enqueued(self, kind: str, outcome: str, n: int) -> None:
        if outcome in SKIPPED_REASONS:
            self._skipped((kind, SKIPPED_REASONS[outcome]), n)
        elif outcome in COLLAPSED_TOOLS:
            self._collapsed((kind, COLLAPSED_TOOLS[outcome]), n)

    @_never_raises
    def batch_started(self, kind: str, size: int) -> None:
        self._batch_size((kind,), size)

    @_never_raises
    def jobs_rescued(self, queue: str, kind: str, n: int) -> None:
        self._finished((queue, kind, "rescued"), n)

    @_never_raises
    def error_classified(self, queue: str, error_class: str) -> None:
        self._errors((queue, error_class))

    @_never_raises
    def actor_restarted(self, actor: str) -> None:
        self._restarts((actor,))

    @_never_raises
    def maintenance_error(self, actor: str, step: str) -> None:
        self._maintenance((actor, step))

    @_never_raises
    def claim_batch(self, queue: str, size: int) -> None:
        self._batch((queue,), size)

    @_never_raises
    def loop_error(self) -> None:
        self._loop_errors(())

    @_never_raises
    def notification_dropped(self, channel: str) -> None:
        self._notifications_dropped((channel,))

    @_never_raises
    def db_round_trip(self, operation: str, seconds: float) -> None:
        self._db((operation,), seconds)

    @_never_raises
    def http_request(self, kind: str, status_class: str, outcome: str, seconds: float) -> None:
        self._http_requests((kind, status_class, outcome))
        self._http_seconds((kind,), 0.0 if seconds < 0.0 else seconds)

    @_never_raises
    def key_paused(self, queue: str, key: str) -> None:
        self._pauses((queue, self._keys(queue, key)))

    @_never_raises
    def breaker_opened(self, queue: str, key: str) -> None:
        self._openings((queue, self._keys(queue, key)))

    @_never_raises
    def key_snapshot(self, queue: str, running: dict[str, int], rate: dict[str, float],
                     breaker_open: dict[str, bool] | None = None) -> None:
        """Replace one queue's per-key gauges (bounded by `KeyLabels.top`)."""
        top = self._keys.top
        key_running = top(queue, dict(running))
        key_rate = top(queue, dict(rate))
        key_breaker = top(queue, {k: float(v) for k, v in (breaker_open or {}).items()})
        # All three computed before any is replaced: a bad value leaves the old snapshot.
        self._live.key_running[queue] = key_running
        self._live.key_rate[queue] = key_rate
        self._live.key_breaker[queue] = key_breaker


def _ignore(*args: object) -> None:
    return None
