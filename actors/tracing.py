"""Spans of attempts and workflow steps, and the one switch that turns them on.

Off (the default, `[tracing] enabled = false`) nothing here builds a span or parses a
trace context: every entry point first reads one module global. The daemon turns it
on with a tracer of its own provider (daemon/tracing.py); tests install one over an
in-memory exporter.

An attempt's span is the current span while its handler runs, so a handler's own spans
(`opentelemetry.trace.get_tracer(...).start_as_current_span`) nest under it: trio copies
the context into the tasks a handler starts and into the thread of a sync handler. Its
parent is the job's stored `traceparent` (the producer's span, or the attempt that
spawned it), so every attempt of one job shares that parent; a retry also links to
the attempt before it, whose span is named in that attempt's stored error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from actors.ports import Claimed, Outcome

log = logging.getLogger("jobd.tracing")

ATTEMPT_SPAN = "jobd.attempt"
STEP_SPAN = "jobd.step"

_tracer: trace.Tracer | None = None
_errors_decoder = msgspec.json.Decoder(list[dict[str, Any]])


def install(tracer: trace.Tracer | None) -> None:
    """Turn spans on with `tracer`, or off with None."""
    global _tracer
    _tracer = tracer


def active() -> bool:
    return _tracer is not None


@contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[trace.Span | None]:
    """A child span of the current one (an attempt's, inside a handler) for `name`, e.g.
    `with span("http.call", {"http.url": url}) as s:`; yields None when tracing is off.
    An exception leaving the block is recorded on the span and re-raised."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=_clean(attributes)) as current:
        yield current


def current_traceparent() -> str | None:
    """The current span as a W3C traceparent, for a job this code enqueues (a child);
    None when tracing is off or no span is current."""
    if _tracer is None:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


class AttemptSpan:
    """One attempt's span: current from `start` until `end`, in the attempt's task."""

    def __init__(self, job: Claimed, wait_s: float):
        assert _tracer is not None
        attributes: dict[str, Any] = {
            "jobd.job_id": job.id, "jobd.queue": job.queue, "jobd.kind": job.kind,
            "jobd.attempt": job.attempt, "jobd.wait_ms": round(wait_s * 1000.0, 3),
        }
        if job.key is not None:
            attributes["jobd.key"] = job.key
        parent = _parent(job.traceparent) if job.traceparent is not None else _ROOT
        self.span = _tracer.start_span(ATTEMPT_SPAN, context=parent, kind=SpanKind.CONSUMER,
                                       attributes=attributes, links=_previous_attempt(job))
        self._token = otel_context.attach(trace.set_span_in_context(self.span))

    def end(self, outcome: Outcome | None, label: str) -> Outcome | None:
        """Close the span with how the attempt ended; returns `outcome`, its error naming
        this span when there is one, so the next attempt can link to it. A failure here
        is tracing's, never the attempt's: it is logged once and `outcome` goes on as it
        was."""
        otel_context.detach(self._token)
        try:
            return self._end(outcome, label)
        except Exception:  # noqa: BLE001 - a span must not cost a job its outcome
            _log_once("end")
            return outcome

    def _end(self, outcome: Outcome | None, label: str) -> Outcome | None:
        span = self.span
        if not span.is_recording():
            span.end()
            return outcome
        span.set_attribute("jobd.outcome", label)
        error = _decoded(outcome.error) if outcome is not None else None
        if outcome is not None and error is not None:
            error_class = str(error.get("class", "unknown"))
            span.set_attribute("jobd.error_class", error_class)
            span.set_status(Status(StatusCode.ERROR, error_class))
            span.add_event("exception", {"exception.type": str(error.get("type") or error_class),
                                         "exception.message": str(error.get("message", ""))})
            ctx = span.get_span_context()
            error["trace_id"] = f"{ctx.trace_id:032x}"
            error["span_id"] = f"{ctx.span_id:016x}"
            outcome = msgspec.structs.replace(outcome, error=msgspec.json.encode(error).decode())
        span.end()
        return outcome


def start_attempt(job: Claimed, wait_s: float) -> AttemptSpan | None:
    """The attempt's span, made current; None (nothing built) when tracing is off."""
    if _tracer is None:
        return None
    try:
        return AttemptSpan(job, wait_s)
    except Exception:  # noqa: BLE001 - the attempt runs untraced rather than not at all
        _log_once("start")
        return None


_logged: set[str] = set()


def _log_once(where: str) -> None:
    if where not in _logged:
        _logged.add(where)
        log.exception("tracing: could not %s an attempt's span (logged once; the attempts "
                      "run on)", where, extra={"event": "tracing.span_failed"})


_ROOT = otel_context.Context()


def _parent(traceparent: str) -> otel_context.Context:
    """The context of a stored traceparent. The column's CHECK (and every edge) holds it
    to the pattern, so a split does what the propagator's regular expressions would, at
    a tenth of their cost; anything else starts a trace of its own."""
    try:
        _, trace_id, span_id, flags = traceparent.split("-")
        ctx = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                          trace_flags=TraceFlags(int(flags, 16) & 0xFF))
    except ValueError:
        return _ROOT
    if not ctx.is_valid:
        return _ROOT
    return trace.set_span_in_context(NonRecordingSpan(ctx), _ROOT)


def _previous_attempt(job: Claimed) -> list[Link] | None:
    """A link to the span of the latest earlier attempt that named one in its error (a
    rescue's error names none: the attempt before the crash is linked instead)."""
    if job.errors in ("[]", ""):
        return None
    try:
        errors = _errors_decoder.decode(job.errors)
    except msgspec.DecodeError:
        return None
    for error in reversed(errors):
        trace_id, span_id = error.get("trace_id"), error.get("span_id")
        if isinstance(trace_id, str) and isinstance(span_id, str):
            try:
                ctx = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                                  trace_flags=TraceFlags(TraceFlags.SAMPLED))
            except ValueError:
                return None
            if not ctx.is_valid:
                return None
            return [Link(ctx, {"jobd.attempt": error.get("attempt", 0)
                               if isinstance(error.get("attempt"), int) else 0})]
    return None


def _decoded(error: str | None) -> dict[str, Any] | None:
    if error is None:
        return None
    try:
        decoded = msgspec.json.decode(error)
    except msgspec.DecodeError:
        return None
    return decoded if isinstance(decoded, dict) else None


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """OpenTelemetry refuses None values (with a warning each): they are left out."""
    if attributes is None:
        return None
    return {k: v for k, v in attributes.items() if v is not None}
