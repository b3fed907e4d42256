"""Check that a request came from jobd: copy this file into your app (stdlib only).

jobd signs every request to an HTTP handler (and every webhook) the Standard Webhooks
way (https://www.standardwebhooks.com/):

    webhook-id:        job_<id>_<attempt>
    webhook-timestamp: Unix seconds when jobd signed it
    webhook-signature: v1,<base64(HMAC-SHA256(key, "<id>.<timestamp>.<raw body>"))>
                       (space-separated when the secret is being rotated)

`key` is the secret's bytes: the base64-decoded part after `whsec_` for a secret
written `whsec_...`, else its UTF-8 bytes. Verify against the raw body bytes, before
parsing them, and refuse timestamps more than five minutes from your clock (a captured
request replayed later then fails).

    from webhook_verify import verify, InvalidSignature

    def handle(headers, raw_body):          # headers: a case-insensitive mapping
        try:
            verify(SECRET, headers, raw_body)
        except InvalidSignature:
            return 401
        job = json.loads(raw_body)          # {"id", "kind", "attempt", "args", ...}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

TOLERANCE_S = 300


class InvalidSignature(Exception):
    pass


def verify(secret: str, headers: Mapping[str, str], body: bytes,
           now: float | None = None) -> None:
    """Return if `headers` sign `body` with `secret`, recently; else raise InvalidSignature.

    `headers` is read with lower-case names (frameworks' header mappings are
    case-insensitive; a plain dict must use lower case)."""
    try:
        msg_id = headers["webhook-id"]
        timestamp = int(headers["webhook-timestamp"])
        signatures = headers["webhook-signature"]
    except (KeyError, ValueError) as exc:
        raise InvalidSignature(f"missing or malformed webhook header: {exc}") from None
    if abs((time.time() if now is None else now) - timestamp) > TOLERANCE_S:
        raise InvalidSignature("webhook-timestamp is more than 5 minutes from now")
    if secret.startswith("whsec_"):
        try:
            key = base64.b64decode(secret[len("whsec_"):], validate=True)
        except binascii.Error:
            raise InvalidSignature("the secret is not valid base64 after whsec_") from None
    else:
        key = secret.encode()
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(mac).decode()
    for candidate in signatures.split():
        if hmac.compare_digest(candidate.encode(), expected.encode()):
            return
    raise InvalidSignature("no signature matches the body")
