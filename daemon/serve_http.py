"""Starting the HTTP server, with the database-derived gauges it serves.

Only when `control.http` is set: without it nobody could scrape the gauges, so their
queries (run by the leader) are not run either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from actors.runtime.clock import Clock
from actors.runtime.mailbox import Mailbox
from actors.services.control import Control
from actors.services.peer import Leadership, Peer
from daemon.api.http import STATUS, HttpApp
from daemon.api.http_server import HttpServer
from daemon.api.requests import Requests
from daemon.config import Config, ConfigError, read_dashboard_token, read_token
from daemon.metrics import Metrics, run_queue_gauges
from daemon.readiness import Readiness
from daemon.store import MetricsSession, PgStore

if TYPE_CHECKING:
    from daemon.dashboard.app import Dashboard

log = logging.getLogger("jobd.app")


async def serve_http(nursery: trio.Nursery, config: Config, *, control: Control, store: PgStore,
                     metrics: Metrics, readiness: Readiness, queues: list[str],
                     key_gauges: Callable[[list[dict[str, Any]]], None],
                     clock: Clock) -> HttpServer | None:
    """The running server (None if `control.http` is not set)."""
    cc = config.control
    if not cc.http:
        return None
    metrics.init_queues(queues)
    # The leader lock is only asked for here: a daemon nobody scrapes must not win it,
    # or the daemons that serve /metrics would export no database-derived gauges.
    leadership: Leadership[MetricsSession] = Leadership()
    await nursery.start(Peer(Mailbox("peer"), store.metrics_session, leadership,
                             interval_s=config.metrics.leader_interval, clock=clock).run)
    await nursery.start(partial(
        run_queue_gauges, leadership, metrics, clock=clock,
        interval_s=config.metrics.leader_interval, key_gauges=key_gauges,
        key_limit=config.metrics.key_series_limit))
    token = read_token(config)
    app = HttpApp(control=control, metrics=metrics, readiness=readiness.http_readiness,
                  token=token, max_body=config.limits.max_frame_bytes,
                  read_timeout_s=cc.http_read_timeout,
                  dashboard=_dashboard(config, control, token, metrics))
    server = HttpServer(app, [cc.http] if isinstance(cc.http, str) else cc.http,
                        graceful_timeout_s=cc.http_graceful_timeout,
                        max_connections=cc.http_max_connections,
                        keep_alive_s=cc.http_keep_alive,
                        write_timeout_s=cc.http_write_timeout)
    try:
        urls = await nursery.start(server.run)
    except OSError as exc:
        raise ConfigError(f"control.http: cannot listen on {server.binds}: {exc}") from exc
    log.info("HTTP on %s", ", ".join(urls), extra={"event": "http.listening"})
    return server


def _dashboard(config: Config, control: Control, token: str | None,
               metrics: Metrics) -> Dashboard | None:
    if not config.dashboard.enabled:
        return None
    from daemon.dashboard.app import Dashboard  # Jinja2 only for a daemon that serves pages
    from daemon.dashboard.sessions import Sessions

    sessions = Sessions(api_token=token, read_token=read_dashboard_token(config),
                        lifetime_s=config.dashboard.session_lifetime)
    return Dashboard(requests=Requests(control, "dashboard"), sessions=sessions,
                     refresh_s=config.dashboard.refresh, region=config.region, status=STATUS,
                     count=lambda reason: metrics.http_errors.inc((reason,)))
