"""`[tracing]`: jobd's OpenTelemetry provider, from start to the last flush.

Off, nothing is built and actors.tracing stays off. On, the provider samples by the
producer's decision when a job carries a traceparent and by `sample_ratio` otherwise,
and a BatchSpanProcessor exports over OTLP/HTTP on its own thread: a slow or dead
endpoint costs jobs nothing (its queue is bounded; past it spans are dropped), it only
loses spans. The provider is also the process's global one, so a handler's own
`trace.get_tracer(...)` spans go out with jobd's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio
from opentelemetry import trace

from actors import tracing
from daemon import __version__
from daemon.config.sections import Tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("jobd.tracing")

# One export request may take this long (the exporter retries within it); the flush at
# exit is bounded alike, so a dead endpoint delays a drain by at most this.
EXPORT_TIMEOUT_S = 5.0
FLUSH_TIMEOUT_S = 5.0


def provider(config: Tracing, *, region: str, daemon_id: str,
             processor: SpanProcessor | None = None) -> TracerProvider:
    """The provider `config` describes; `processor` replaces the OTLP exporter's batch
    processor (tests and the bench give an in-memory one)."""
    # The SDK is imported here: a daemon that does not trace never loads it (1.4 MB and
    # 5,000 objects for the collector to walk, with the API).
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create({
        "service.name": config.service_name, "service.version": __version__,
        "service.instance.id": daemon_id, "jobd.region": region,
    })
    made = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(
        config.sample_ratio)), shutdown_on_exit=False)
    made.add_span_processor(processor or BatchSpanProcessor(_exporter(config)))
    return made


def _exporter(config: Tracing) -> SpanExporter:
    # Imported here: the exporter is an optional extra (checked when the config loads).
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=config.endpoint, timeout=EXPORT_TIMEOUT_S)


# The exporter logs each failed try of each batch (three lines every 5 s while the
# endpoint is down): one line a minute says as much.
_EXPORT_LOGGERS = ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                   "opentelemetry.exporter.otlp.common.http",
                   "opentelemetry.sdk.trace.export", "opentelemetry.sdk._shared_internal")
_EXPORT_LOG_EVERY_S = 60.0


class _OncePerMinute(logging.Filter):
    """Lets one record through per interval, naming how many it held back since."""

    def __init__(self, every_s: float = _EXPORT_LOG_EVERY_S):
        super().__init__()
        self._every_s = every_s
        self._last = -every_s
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._last < self._every_s:
            self._held += 1
            return False
        if self._held:
            record.msg = f"{record.msg} ({self._held} more export messages held back)"
        self._last, self._held = now, 0
        if not hasattr(record, "event"):
            record.event = "tracing.export_failed"
        return True


def _quiet_export_logs() -> None:
    for name in _EXPORT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OncePerMinute) for f in logger.filters):
            logger.addFilter(_OncePerMinute())


@asynccontextmanager
async def traced(config: Tracing, *, region: str, daemon_id: str) -> AsyncIterator[None]:
    """Spans on for the body (when `config.enabled`); on the way out the spans still
    queued are exported, for at most FLUSH_TIMEOUT_S."""
    if not config.enabled:
        yield
        return
    _quiet_export_logs()
    made = provider(config, region=region, daemon_id=daemon_id)
    trace.set_tracer_provider(made)
    tracing.install(made.get_tracer("jobd", __version__))
    log.info("tracing to %s (sample ratio %g)", config.endpoint, config.sample_ratio,
             extra={"event": "tracing.started", "endpoint": config.endpoint})
    try:
        yield
    finally:
        tracing.install(None)
        # Shielded from the daemon's own cancellation, bounded by its own deadline.
        with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_TIMEOUT_S) as flushing:
            await trio.to_thread.run_sync(made.shutdown, abandon_on_cancel=True)
        if flushing.cancelled_caught:
            log.warning("spans not exported within %gs were dropped", FLUSH_TIMEOUT_S,
                        extra={"event": "tracing.flush_timeout"})
