"""The dashboard's routes: sign-in, the session gate, CSRF, and the answers.

Every page and action is a control command answered by `daemon.api.requests` — the
path `jobctl` takes — so the dashboard can do nothing the API cannot, and each action
is audit-logged naming the signed-in user. Pages are whole HTML documents that work
without JavaScript; htmx (vendored, static/) re-fetches each page's `#live` part.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from daemon.api.requests import Peer, Requests
from daemon.dashboard import forms
from daemon.dashboard.pages import Pages, Redirect
from daemon.dashboard.render import Renderer
from daemon.dashboard.sessions import COOKIE, Session, Sessions, same_origin
from protocol import commands as c
from protocol.errors import ErrorCode, JobdError

log = logging.getLogger("jobd.dashboard")

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ReadBody = Callable[[], Awaitable[bytes]]

PREFIX = "/ui"
NAME_MAX_CHARS = 100
FLASH = "jobd_flash"

_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_SECURITY = [
    (b"content-security-policy", _CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
_HTML = b"text/html; charset=utf-8"
_STATIC_TYPES = {".js": b"text/javascript; charset=utf-8", ".css": b"text/css; charset=utf-8",
                 ".svg": b"image/svg+xml", ".png": b"image/png"}
_STATIC_DIR = Path(__file__).with_name("static")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class Dashboard:
    def __init__(self, *, requests: Requests, sessions: Sessions, refresh_s: float,
                 region: str, status: dict[str, int],
                 count: Callable[[str], None] = lambda reason: None):
        self._requests = requests
        self._count = count  # jobd_http_errors_total{reason}
        self._sessions = sessions
        self._status = status  # error code -> HTTP status, the API's own table
        self._render = Renderer(region=region, refresh_ms=int(refresh_s * 1000))
        self._pages = Pages(self._ask, self._render)
        self._static = {p.name: p.read_bytes() for p in _STATIC_DIR.iterdir() if p.is_file()}

    async def __call__(self, scope: Scope, send: Send, read_body: ReadBody) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if not self._sessions.enabled:
            await self._page(send, 403, self._render.message(
                "The dashboard is off", "No token is configured: set control.token_file "
                "(or dashboard.read_token_file) and restart, as for the HTTP API."))
            return
        if path == PREFIX:
            await self._redirect(send, PREFIX + "/")
            return
        rest = path.removeprefix(PREFIX)
        if rest.startswith("/static/") and method in ("GET", "HEAD"):
            await self._static_file(send, rest.removeprefix("/static/"), method == "HEAD")
            return
        if method == "POST" and not same_origin(headers):
            self._refused(scope, "cross-origin request", "dashboard_cross_origin")
            await self._page(send, 403, self._render.message(
                "Refused", "CSRF check failed: this request came from another site."))
            return
        if rest == "/login":
            await self._login(scope, send, read_body, method, headers)
            return
        session = self._session(headers)
        if session is None:
            if method in ("GET", "HEAD"):
                query = scope.get("query_string", b"").decode("latin-1")
                here = path + (f"?{query}" if query else "")
                await self._redirect(send, f"{PREFIX}/login?next={quote(here, safe='/')}")
            else:
                await self._page(send, 401, self._render.message(
                    "Signed out", "Your session has ended: sign in again."))
            return
        try:
            if method in ("GET", "HEAD"):
                query = forms.parse(scope.get("query_string", b"").decode("latin-1"))
                html = await self._pages.get(rest, query, self._context(session, scope, headers))
                await self._page(send, 200, html, head=method == "HEAD")
            elif method == "POST":
                fields = forms.parse((await read_body()).decode("utf-8", errors="strict"))
                if not self._sessions.csrf_ok(session, dict(fields).get("csrf", "")):
                    self._refused(scope, "CSRF token missing or wrong", "dashboard_csrf")
                    await self._page(send, 403, self._render.message(
                        "Refused", "CSRF check failed: reload the page and try again."))
                    return
                if rest == "/logout":
                    await self._redirect(send, f"{PREFIX}/login", cookies=[_clear(COOKIE)])
                    return
                if not session.can_act:
                    self._refused(scope, "read-only session", "dashboard_read_only")
                    await self._page(send, 403, self._render.message(
                        "Read-only", "This is a read-only session: sign in with the API "
                        "token to act."))
                    return
                peer = Peer(f"from the dashboard, user {session.name or '(unnamed)'!r} at "
                            f"{_client(scope)}", {"via": "dashboard", "user": session.name,
                                                 "client": _client(scope)})
                html = await self._pages.post(rest, fields, self._context(session, scope, headers),
                                              peer)
                await self._page(send, 200, html)
            else:
                await self._page(send, 405, self._render.message(
                    "Method not allowed", f"{method} is not allowed here."),
                    extra=[(b"allow", b"GET, HEAD, POST")])
        except Redirect as r:
            cookies = [_flash_cookie(r.flash)] if r.flash else []
            await self._redirect(send, r.location, cookies=cookies)
        except UnicodeDecodeError:
            await self._failed(send, session, scope, headers,
                               JobdError("the form is not UTF-8", code=ErrorCode.BAD_REQUEST))
        except JobdError as exc:
            await self._failed(send, session, scope, headers, exc)

    async def _ask(self, cmd: Any, peer: Peer | None = None) -> Any:
        """The command's result; its error envelope raised as a JobdError."""
        reply = await self._requests.answer(cmd, peer or _READER)
        if isinstance(reply, c.Error):
            raise JobdError(reply.message, code=reply.code, details=reply.details)
        return reply.result

    async def _login(self, scope: Scope, send: Send, read_body: ReadBody, method: str,
                     headers: dict[bytes, bytes]) -> None:
        query = dict(forms.parse(scope.get("query_string", b"").decode("latin-1")))
        if method in ("GET", "HEAD"):
            await self._page(send, 200, self._render.login(forms.dashboard_path(query.get("next"))),
                             head=method == "HEAD")
            return
        if method != "POST":
            await self._page(send, 405, self._render.message("Method not allowed", method))
            return
        try:
            fields = dict(forms.parse((await read_body()).decode("utf-8", errors="strict")))
        except (JobdError, UnicodeDecodeError):
            fields = {}
        name = _CONTROL_CHARS.sub("", fields.get("name", "")).strip()[:NAME_MAX_CHARS]
        target = forms.dashboard_path(fields.get("next"))
        session = self._sessions.sign_in(fields.get("token", ""), name)
        if session is None:
            self._refused(scope, "wrong token at sign-in", "dashboard_sign_in")
            await self._page(send, 401, self._render.login(target, error="wrong token"))
            return
        log.info("dashboard sign-in: user %r (%s) at %s", name or "(unnamed)", session.role,
                 _client(scope), extra={"event": "dashboard.sign_in", "user": name,
                                        "role": session.role, "client": _client(scope)})
        https = scope.get("scheme") == "https" or headers.get(b"x-forwarded-proto") == b"https"
        secure = "; Secure" if https else ""
        cookie = (f"{COOKIE}={self._sessions.cookie_value(session)}; Path={PREFIX}; HttpOnly; "
                  f"SameSite=Strict; Max-Age={int(self._sessions.lifetime_s)}{secure}")
        await self._redirect(send, target, cookies=[cookie])

    def _session(self, headers: dict[bytes, bytes]) -> Session | None:
        value = _cookies(headers).get(COOKIE)
        return self._sessions.from_cookie(value) if value else None

    def _context(self, session: Session, scope: Scope,
                 headers: dict[bytes, bytes]) -> dict[str, Any]:
        query = scope.get("query_string", b"").decode("latin-1")
        return {"session": session, "csrf": self._sessions.csrf_token(session),
                "here": scope["path"] + (f"?{query}" if query else ""),
                "flash": unquote(_cookies(headers).get(FLASH, ""))[:200],
                "partial": headers.get(b"hx-request") == b"true"}

    async def _failed(self, send: Send, session: Session | None, scope: Scope,
                      headers: dict[bytes, bytes], exc: JobdError) -> None:
        status = self._status.get(str(exc.code), 500)
        context = self._context(session, scope, headers) if session else None
        await self._page(send, status, self._render.message(
            "Not found" if status == 404 else "Refused" if status < 500 else "Failed",
            f"{exc.code}: {exc.message}", context=context))

    def _refused(self, scope: Scope, why: str, reason: str) -> None:
        self._count(reason)
        log.warning("dashboard %s %s refused: %s", scope.get("method"), scope.get("path"), why,
                    extra={"event": "dashboard.refused", "reason": why,
                           "client": _client(scope)})

    async def _static_file(self, send: Send, name: str, head: bool) -> None:
        body = self._static.get(name)
        if body is None:
            await self._page(send, 404, self._render.message("Not found", name[:100]))
            return
        kind = _STATIC_TYPES.get(Path(name).suffix, b"application/octet-stream")
        await _respond(send, 200, body, kind, head=head,
                       cache=b"public, max-age=3600")

    async def _page(self, send: Send, status: int, html: str, *, head: bool = False,
                    extra: list[tuple[bytes, bytes]] | None = None) -> None:
        # The flash message has been shown: forget it.
        await _respond(send, status, html.encode(), _HTML, head=head,
                       extra=[(b"set-cookie", _clear(FLASH).encode()), *(extra or [])])

    async def _redirect(self, send: Send, location: str, *,
                        cookies: list[str] | None = None) -> None:
        extra = [(b"location", location.encode()),
                 *((b"set-cookie", cookie.encode()) for cookie in cookies or [])]
        await _respond(send, 303, b"", _HTML, extra=extra)


_READER = Peer("from the dashboard")


async def _respond(send: Send, status: int, body: bytes, content_type: bytes, *,
                   head: bool = False, cache: bytes = b"no-store",
                   extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
               (b"cache-control", cache), *_SECURITY, *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def _cookies(headers: dict[bytes, bytes]) -> dict[str, str]:
    jar: dict[str, str] = {}
    for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            jar.setdefault(name, value)
    return jar


def _clear(name: str) -> str:
    return f"{name}=; Path={PREFIX}; HttpOnly; SameSite=Strict; Max-Age=0"


def _flash_cookie(text: str) -> str:
    return f"{FLASH}={quote(text[:200], safe='')}; Path={PREFIX}; HttpOnly; SameSite=Strict; Max-Age=30"


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unix socket"
