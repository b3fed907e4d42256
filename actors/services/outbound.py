"""The one way jobd sends a request out: calls to HTTP handlers and completion webhooks.

Destinations come only from config, never from job args, and must pass the `[http]`
allow-list; redirects are not followed unless config says so (a redirect could carry a
signed body to a host nobody allowed); TLS is verified. One httpx client pools
connections per origin, and a limiter per origin bounds how many requests are in
flight to it, so one slow endpoint cannot take every connection. A response body is
read only up to `max_body_bytes`: past that the response is marked `too_large` and the
rest is never buffered.
"""

from __future__ import annotations

import urllib.parse

import httpx
import msgspec
import trio

_CALLS_PER_POOL = 10
USER_AGENT = "jobd"


class DestinationRefused(Exception):
    """The URL is not http(s) or its host is not in `[http] allow_hosts`."""


class Response(msgspec.Struct, frozen=True):
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    too_large: bool = False


def origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def check_destination(url: str, allow_hosts: list[str]) -> None:
    """Refuse what config must not be able to send to. An empty allow-list allows any
    host; an entry `.example.com` allows that domain's subdomains."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DestinationRefused(f"{url!r} is not an http(s) URL with a host")
    if not allow_hosts:
        return
    host = parts.hostname.lower()
    for allowed in allow_hosts:
        allowed = allowed.lower()
        if host == allowed or (allowed.startswith(".") and host.endswith(allowed)):
            return
    raise DestinationRefused(f"host {host!r} is not in [http] allow_hosts")


class Outbound:
    def __init__(self, *, allow_hosts: list[str], follow_redirects: bool = False,
                 per_origin: int = 100, max_body_bytes: int = 1 << 20) -> None:
        self.allow_hosts = list(allow_hosts)
        self.per_origin = per_origin
        self.max_body_bytes = max_body_bytes
        self._limiters: dict[str, trio.CapacityLimiter] = {}
        # Several pools, taken in turn: httpcore's pool scans every connection and
        # waiting request on each step, so one pool with 100 calls in flight cost 2.6 ms
        # of CPU per call against 0.96 ms for ten pools of ten (bench/http_handlers.py).
        # Requests go to the transport itself unless redirects are followed: the client's
        # layers (redirects, cookies, auth, hooks) cost ~130 us of the ~500 us of a call.
        shards = max(1, -(-per_origin // _CALLS_PER_POOL))
        # One TLS context (verifying, the system's CAs) for all: each costs ~45 ms to build.
        tls = httpx.create_ssl_context()
        self._pools = [httpx.AsyncHTTPTransport(
            verify=tls, trust_env=False,
            limits=httpx.Limits(max_connections=None,
                                max_keepalive_connections=min(per_origin, _CALLS_PER_POOL)))
            for _ in range(shards)]
        self._redirecting = [httpx.AsyncClient(transport=pool, follow_redirects=True,
                                               trust_env=False)
                             for pool in self._pools] if follow_redirects else []
        self._turn = 0

    def limiter(self, url: str) -> trio.CapacityLimiter:
        key = origin(url)
        found = self._limiters.get(key)
        if found is None:
            found = self._limiters[key] = trio.CapacityLimiter(self.per_origin)
        return found

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   timeout_s: float) -> Response:
        """POST `body`; httpx's own exceptions (timeouts, refused connections) propagate,
        and the retry table classes them as network errors."""
        check_destination(url, self.allow_hosts)
        async with self.limiter(url):
            turn = self._turn % len(self._pools)
            self._turn += 1
            # identity: the body is read raw (capped), so it must not come compressed.
            request = httpx.Request(
                "POST", url, content=body,
                headers={"content-type": "application/json", "accept-encoding": "identity",
                         "user-agent": USER_AGENT, **headers},
                extensions={"timeout": httpx.Timeout(timeout_s).as_dict()})
            if self._redirecting:
                response = await self._redirecting[turn].send(request, stream=True)
            else:
                response = await self._pools[turn].handle_async_request(request)
            try:
                chunks: list[bytes] = []
                size = 0
                too_large = False
                async for chunk in response.aiter_raw():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        too_large = True
                        break
                    chunks.append(chunk)
            finally:
                await response.aclose()
        return Response(status=response.status_code,
                        headers={k.lower(): v for k, v in response.headers.items()},
                        body=b"" if too_large else b"".join(chunks), too_large=too_large)

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()
