"""One request path for every transport: decode, audit, answer, envelope.

The socket and HTTP differ in framing (a line with `type` and `id` against a path that
names the command and a body of its fields) and in auth (file permissions against a
bearer token); what a request means does not. So the decoding errors, the audit line of
a mutating command and the ok/error envelope are written here once, and each transport
keeps only what is its own: the socket its handshake and `watch` streams, HTTP its
routes and status codes. A transport still contains a crash at its own boundary (it
also has failures outside any command: a write that fails, a metrics exposition).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from protocol import commands as c
from protocol.errors import BadRequest, ErrorCode, JobdError
from protocol.jobs import TRACEPARENT_PATTERN


class Answers(Protocol):
    """What a transport needs of `actors.services.control.Control`."""

    def hello(self, cmd: c.Hello) -> c.HelloResult: ...

    async def handle(self, cmd: c.Command) -> Any: ...


@dataclass(frozen=True)
class Peer:
    """Who sent a request, as its audit line names them."""

    said: str  # after the command's name: "from uid 1000", "over HTTP from 10.0.0.7"
    fields: dict[str, Any] = field(default_factory=dict)  # e.g. the socket's SO_PEERCRED


# The command structs by name: the socket's `type`, the HTTP path's last part.
COMMANDS: dict[str, type] = {
    t.__struct_config__.tag: t for t in c.RESULT_TYPES  # type: ignore[attr-defined]
}


# Mutating commands whose audit line is at debug (see Requests.audit).
QUIET = (c.Enqueue, c.EnqueueBatch, c.SendEvent, c.SendEvents)


def decode(decoder: c.JsonDecoder, data: bytes) -> Any:
    """`data` as the decoder's type; a request that is not one is `bad_request` (wrong
    shape, naming the field) or `bad_json` (not JSON at all)."""
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:  # a subclass of DecodeError: catch it first
        raise BadRequest(str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec raises UnicodeDecodeError for invalid UTF-8 inside a JSON string;
        # JsonDecoder turns JSON nested too deeply into a DecodeError.
        raise JobdError(str(exc), code=ErrorCode.BAD_JSON) from None


def _traceparent(header: bytes) -> str:
    value = header.decode("latin-1").strip()
    if not _TRACEPARENT.match(value):
        raise BadRequest(f"the traceparent header is not a W3C trace context "
                         f"(00-<32 hex>-<16 hex>-<2 hex>, lower case): {value[:100]!r}",
                         details={"header": "traceparent"})
    return value


_TRACEPARENT = re.compile(TRACEPARENT_PATTERN)


def _target(cmd: c.Command) -> str:
    """What a mutating command acts on, for its audit line: the fields it was given
    (ids, filters, queue and key, a schedule's name), cut at AUDIT_TARGET_CHARS."""
    given = {f: v for f in cmd.__struct_fields__ if f != "id"
             and (v := getattr(cmd, f)) not in (None, [], {}, False)}
    text = " ".join(f"{f}={v}" for f, v in given.items())
    return text if len(text) <= AUDIT_TARGET_CHARS else text[:AUDIT_TARGET_CHARS] + "…"


AUDIT_TARGET_CHARS = 300


def error(exc: JobdError, request_id: int | None = None) -> c.Error:
    return c.Error(id=request_id, code=str(exc.code), message=exc.message, details=exc.details)


class Requests:
    """Answers decoded commands for one transport; `transport` names its logger
    (`jobd.<transport>`) and its audit event (`<transport>.request`)."""

    def __init__(self, control: Answers, transport: str):
        self._control = control
        self._log = logging.getLogger(f"jobd.{transport}")
        self._event = f"{transport}.request"
        self._bodies = {name: c.JsonDecoder(t) for name, t in COMMANDS.items()}

    def decode_line(self, line: bytes) -> c.Command | c.Error:
        """A socket request: one JSON object naming its command in `type`. An error
        carries the request's id whenever enough of the line decodes to read it."""
        try:
            cmd: c.Command = decode(c.command_decoder, line)
            return cmd
        except BadRequest as exc:
            failure: JobdError = exc
        except JobdError as exc:
            failure = exc
        # Only a bad line pays for a second decode: the envelope, for its id and type.
        try:
            envelope = decode(c.envelope_decoder, line)
        except BadRequest:
            envelope = c._Envelope()  # valid JSON, odd id or type
        except JobdError as exc:
            return error(exc)
        request_id = envelope.id if isinstance(envelope.id, int) else None
        if (isinstance(failure, BadRequest) and envelope.type is not None
                and envelope.type not in COMMANDS):
            return error(JobdError(failure.message, code=ErrorCode.UNKNOWN_COMMAND), request_id)
        return error(failure, request_id)

    def decode_body(self, name: str, body: bytes, traceparent: bytes | None = None) -> c.Command:
        """An HTTP request: `name` from the path, the command's fields in the body (no
        body at all means no fields). Raises JobdError; `name` must be in COMMANDS.

        `traceparent` (the request's W3C header) is the trace context of every job of an
        enqueue that names none in its body; a malformed one is refused, as in a body."""
        cmd: c.Command = decode(self._bodies[name], body or b"{}")
        if traceparent is not None and isinstance(cmd, c.Enqueue | c.EnqueueBatch):
            given = _traceparent(traceparent)
            for spec in [cmd.job] if isinstance(cmd, c.Enqueue) else cmd.jobs:
                if spec.traceparent is None:
                    spec.traceparent = given
        return cmd

    def audit(self, cmd: c.Command, peer: Peer, request_id: int | None = None) -> None:
        """The line of a mutating command: what was asked, by whom. At info, except an
        enqueue's or an event's at debug: they come by the thousand a second, a line each
        was about a tenth of a request's cost, and jobd_jobs_enqueued_total and
        jobd_events_received_total count them."""
        name = type(cmd).__struct_config__.tag
        level = logging.DEBUG if isinstance(cmd, QUIET) else logging.INFO
        if not self._log.isEnabledFor(level):
            return
        # Not an enqueue's or event's: their args are the user's data, not a target.
        target = "" if isinstance(cmd, QUIET) else _target(cmd)
        self._log.log(level, "%s %s%s", name, peer.said, f": {target}" if target else "", extra={
            "event": self._event, "command": name, "request_id": request_id,
            "target": target, **peer.fields})

    async def answer(self, cmd: c.Command, peer: Peer,
                     request_id: int | None = None) -> c.Ok | c.Error:
        """The reply envelope to `cmd`, with `request_id` echoed. A JobdError is an
        error envelope; anything else raised is a bug the transport's boundary holds."""
        if cmd.mutating:
            self.audit(cmd, peer, request_id)
        try:
            if isinstance(cmd, c.Hello):
                result = self._control.hello(cmd)
            else:
                result = await self._control.handle(cmd)
        except JobdError as exc:
            return error(exc, request_id)
        return c.Ok(id=request_id, result=result)
