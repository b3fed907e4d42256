"""Standard Webhooks signatures (https://www.standardwebhooks.com/), for every request jobd
sends out: calls to HTTP handlers and completion webhooks.

A request carries three headers:

    webhook-id:        a unique message id (the same on every retry of one message)
    webhook-timestamp: Unix seconds when this attempt was signed
    webhook-signature: "v1,<base64 HMAC-SHA256(key, f'{id}.{timestamp}.{body}')>"

`webhook-signature` is a space-separated list, so a key can be rotated by signing with
the old and the new one for a while. A secret written `whsec_<base64>` keys the HMAC
with the decoded bytes (the scheme's own format); any other secret keys it with its UTF-8
bytes. A receiver checks the timestamp is within `TOLERANCE_S` of its clock (replays of
an old capture fail) and compares in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

SECRET_PREFIX = "whsec_"
TOLERANCE_S = 300


class InvalidSignature(Exception):
    """The headers are missing, stale, or no signature in them matches the body."""


def secret_key(secret: str) -> bytes:
    """The HMAC key a secret stands for; a `whsec_` secret that is not base64 is refused."""
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
        except binascii.Error:
            raise ValueError("a whsec_ secret must be base64 after the prefix") from None
    if not secret:
        raise ValueError("the signing secret is empty")
    return secret.encode()


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def sign_headers(keys: list[bytes], msg_id: str, body: bytes,
                 now: float | None = None) -> dict[str, str]:
    """The three headers for one attempt at sending `body`, signed with every key."""
    timestamp = int(time.time() if now is None else now)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(k, msg_id, timestamp, body) for k in keys),
    }


def verify(secret: str, headers: Mapping[str, str], body: bytes,
           now: float | None = None, tolerance_s: float = TOLERANCE_S) -> None:
    """Raise InvalidSignature unless `headers` sign `body` with `secret`, recently enough.

    `headers` is looked up with lower-case names (most frameworks' header mappings are
    case-insensitive; a plain dict must use lower case)."""
    try:
        msg_id = headers["webhook-id"]
        stamp = headers["webhook-timestamp"]
        signatures = headers["webhook-signature"]
    except KeyError as exc:
        raise InvalidSignature(f"missing header {exc.args[0]}") from None
    try:
        timestamp = int(stamp)
    except ValueError:
        raise InvalidSignature("webhook-timestamp is not an integer") from None
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        raise InvalidSignature("webhook-timestamp is outside the tolerance")
    expected = signature(secret_key(secret), msg_id, timestamp, body)
    for candidate in signatures.split():
        if hmac.compare_digest(candidate.encode(), expected.encode()):
            return
    raise InvalidSignature("no signature matches")
