"""Dashboard sessions: a signed cookie, its CSRF token, and the cross-origin check.

The session lives in the cookie, not in the daemon: every daemon behind one load
balancer accepts it, and it survives a restart. Its key is derived from the tokens
themselves, so rotating either token signs every session out, as rotating a password
should. A stolen cookie is still good until it expires (dashboard.session_lifetime);
sign-out only forgets it in the browser that signs out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import msgspec

COOKIE = "jobd_session"
WRITE, READ = "write", "read"


class _Payload(msgspec.Struct, array_like=True):
    sid: str
    name: str
    role: str
    expires: float


@dataclass(frozen=True)
class Session:
    sid: str
    name: str  # as typed at sign-in, for the audit log; "" when left empty
    role: str  # WRITE or READ
    expires: float

    @property
    def can_act(self) -> bool:
        return self.role == WRITE


class Sessions:
    def __init__(self, *, api_token: str | None, read_token: str | None, lifetime_s: float):
        self._tokens = {role: t.encode() for role, t in ((WRITE, api_token), (READ, read_token))
                        if t}
        self._key = hmac.new(b"jobd dashboard session v1",
                             b"\0".join(self._tokens.get(r, b"") for r in (WRITE, READ)),
                             hashlib.sha256).digest()
        self.lifetime_s = lifetime_s

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def sign_in(self, token: str, name: str, now: float | None = None) -> Session | None:
        """A new session for whoever holds `token`; None when it is neither token."""
        given = token.strip().encode()
        for role, expected in self._tokens.items():
            if hmac.compare_digest(given, expected):
                return Session(secrets.token_urlsafe(16), name, role,
                               (time.time() if now is None else now) + self.lifetime_s)
        return None

    def cookie_value(self, session: Session) -> str:
        payload = _b64(msgspec.msgpack.encode(
            _Payload(session.sid, session.name, session.role, session.expires)))
        return f"{payload}.{self._mac(payload)}"

    def from_cookie(self, value: str, now: float | None = None) -> Session | None:
        """The session the cookie holds, or None: forged, expired, or for a role whose
        token is gone."""
        payload, _, mac = value.partition(".")
        if not payload or not hmac.compare_digest(mac.encode(), self._mac(payload).encode()):
            return None
        try:
            p = msgspec.msgpack.decode(_unb64(payload), type=_Payload)
        except (msgspec.DecodeError, ValueError):
            return None
        if p.expires < (time.time() if now is None else now) or p.role not in self._tokens:
            return None
        return Session(p.sid, p.name, p.role, p.expires)

    def csrf_token(self, session: Session) -> str:
        return self._mac("csrf:" + session.sid)

    def csrf_ok(self, session: Session, given: str) -> bool:
        return hmac.compare_digest(given.encode(errors="replace"), self.csrf_token(session).encode())

    def _mac(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())


def same_origin(headers: dict[bytes, bytes]) -> bool:
    """False for a request a browser says comes from another site. Browsers send Origin
    (or at least Sec-Fetch-Site) with every POST; a client sending neither is not a
    browser that a forged page could drive, and still needs the session and CSRF token.

    The Origin's host is compared with the Host header (or X-Forwarded-Host), not its
    scheme: behind a proxy that ends TLS the page is https and the request reaching jobd
    is http. The CSRF token, not this, is what a forged request cannot have."""
    site = headers.get(b"sec-fetch-site")
    if site is not None and site not in (b"same-origin", b"none"):
        return False
    origin = headers.get(b"origin")
    if origin is None:
        return True
    scheme, _, host = origin.decode("latin-1").partition("://")
    if scheme not in ("http", "https") or not host:
        return False  # "null" (a sandboxed frame, a file: page) and the like
    ours = {headers.get(b"host"), headers.get(b"x-forwarded-host")} - {None}
    return host.encode("latin-1") in ours


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
