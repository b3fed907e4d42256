"""Structured logs: one JSON object per line on stdout, or a readable line on a TTY.

Everything goes through stdlib logging, so hypercorn, asyncio and asyncpg land in
the same stream. Fields beyond the standard ones come from `extra=`:

    log.info("job finished", extra={"event": "job.finished", "job_id": 42, "duration_s": 0.7})
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO

import msgspec

# httpx logs a line per request at info: an HTTP kind's every call (counted instead in
# jobd_http_requests_total), the log's bulk and a measurable part of a call's CPU.
_NOISY = ("asyncio", "hypercorn.access", "httpx", "httpcore")

# Every attribute a bare LogRecord carries; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",  # 3.12+
}
_OWN = frozenset({"event", "actor"})

_encoder = msgspec.json.Encoder()


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and k not in _OWN}


def _exc_text(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    parts = []
    if record.exc_info and record.exc_info[0] is not None:
        # Cached on the record like logging.Formatter does, for handlers that follow.
        if not record.exc_text:
            record.exc_text = formatter.formatException(record.exc_info)
        parts.append(record.exc_text)
    elif not record.exc_info and record.exc_text:
        parts.append(record.exc_text)  # a record rebuilt elsewhere (e.g. unpickled)
    if record.stack_info:
        parts.append(formatter.formatStack(record.stack_info))
    return "\n".join(parts) or None


class JsonFormatter(logging.Formatter):
    """`{"ts":…,"level":…,"logger":…,"msg":…,<static>,"event":…,"actor":…,<extra>,"exc":…}`"""

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        secs = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{secs}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self._static,
        }
        for key in ("event", "actor"):
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        for key, value in _extras(record).items():
            out.setdefault(key, value)  # an extra named like a core or static field loses
        exc = _exc_text(self, record)
        if exc is not None:
            out["exc"] = exc
        try:
            return _encoder.encode(out).decode()
        except (TypeError, ValueError, OverflowError):
            # A log call must never fail because of a field: repr what msgspec refuses.
            return _encoder.encode({k: _encodable(v) for k, v in out.items()}).decode()


def _encodable(value: Any) -> Any:
    try:
        return msgspec.Raw(_encoder.encode(value))
    except (TypeError, ValueError, OverflowError):
        return repr(value)


class HumanFormatter(logging.Formatter):
    """`HH:MM:SS level logger event msg k=v …`, then the traceback, for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            time.strftime("%H:%M:%S", time.localtime(record.created)),
            f"{record.levelname.lower():<7}",
            record.name,
        ]
        for key in ("event", "actor"):
            value = record.__dict__.get(key)
            if value is not None:
                parts.append(str(value))
        parts.append(record.getMessage())
        parts.extend(f"{k}={_human_value(v)}" for k, v in _extras(record).items())
        line = " ".join(parts)
        exc = _exc_text(self, record)
        return line if exc is None else f"{line}\n{exc}"


def _human_value(value: Any) -> str:
    text = str(value)
    return repr(text) if not text or any(c.isspace() for c in text) else text


class _JournalPrefix(logging.Formatter):
    """Prefixes `<N>` so journald records the priority (`SyslogLevelPrefix=`, on by default)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.ERROR:
            prefix = "<3>"
        elif record.levelno >= logging.WARNING:
            prefix = "<4>"
        elif record.levelno >= logging.INFO:
            prefix = "<6>"
        else:
            prefix = "<7>"
        # journald makes each line its own entry, so a human traceback needs it per line.
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


class _Handler(logging.StreamHandler):
    """Marks the handler jobd installed, so reconfiguring replaces exactly it."""


def _is_journal(stream: TextIO) -> bool:
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _level(level: str) -> int:
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r}")
    return number


def configure_logging(
    level: str = "info",
    *,
    stream: TextIO | None = None,
    fmt: str = "auto",
    static: dict[str, Any] | None = None,
) -> None:
    """Install (or replace, e.g. on SIGHUP) jobd's handler on the root logger."""
    number = _level(level)
    stream = sys.stdout if stream is None else stream
    if fmt == "auto":
        fmt = "human" if _is_tty(stream) else "json"
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(static)
    elif fmt == "human":
        formatter = HumanFormatter()
    else:
        raise ValueError(f"unknown log format {fmt!r} (expected auto, json or human)")
    if _is_journal(stream):
        formatter = _JournalPrefix(formatter)

    handler = _Handler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(number)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(_level(level))
