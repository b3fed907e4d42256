"""Sans-I/O newline-delimited JSON framing for the control socket.

One msgspec-encoded message per line. msgspec escapes newlines inside strings, so a raw
b"\\n" only ever ends a frame and `socat`/`jq` can speak the protocol by hand.
"""

from __future__ import annotations

from typing import Any

import msgspec

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 1 << 20

_encoder = msgspec.json.Encoder()


class FrameTooLong(Exception):
    """A peer sent (or is still sending) a line longer than the limit; drop the connection."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"line exceeds {limit} bytes")
        self.limit = limit


class LineBuffer:
    """Splits a byte stream into lines; the limit counts the bytes before b"\\n".

    After FrameTooLong the buffer is emptied and the stream is mid-line garbage, so the
    caller should close the connection rather than keep feeding.
    """

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be positive, got {max_line}")
        self._max = max_line
        self._buf = bytearray()
        # Everything before this offset holds no b"\n", so a long line arriving in small
        # chunks is scanned once overall, not once per chunk.
        self._scanned = 0

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        lines = []
        start = 0
        while (end := buf.find(b"\n", self._scanned)) != -1:
            if end - start > self._max:
                self._reset()
                raise FrameTooLong(self._max)
            line = bytes(buf[start:end])
            lines.append(line[:-1] if line.endswith(b"\r") else line)
            start = self._scanned = end + 1
        # One deletion per feed keeps a burst of small lines linear in its size.
        del buf[:start]
        self._scanned = len(buf)
        if len(buf) > self._max:
            self._reset()
            raise FrameTooLong(self._max)
        return lines

    def pending(self) -> int:
        return len(self._buf)

    def _reset(self) -> None:
        self._buf.clear()
        self._scanned = 0


def encode_line(obj: Any) -> bytes:
    return _encoder.encode(obj) + b"\n"
