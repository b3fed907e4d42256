"""A private Postgres cluster for ``jobd run`` when no database is configured.

Layout under ``<root>/pg``::

    data/            PGDATA (owned by the server user, mode 0700)
    data/postgres.log  server log (written by pg_ctl -l)
    run/             Unix socket directory (when the path is short enough)
    .lock            flock taken while starting/stopping

The package is split by what can go wrong where: `binaries` finds the server programs
and runs nothing but them (a clean environment); `pidfile` reads postmaster.pid and
tells a live postmaster from a reused pid; `privileges` is what running as root takes
(an unprivileged server user, o+x on the way in); `cluster` is the lifecycle
(initdb, start or adopt, create_database, stop).

The server listens on a Unix socket only (``listen_addresses = ''``), so any
number of clusters can run side by side without fighting over TCP ports.

Everything here is synchronous (subprocess); call it from trio via
``trio.to_thread.run_sync``.
"""

from daemon.embedded.binaries import EmbeddedPostgresError, find_bindir
from daemon.embedded.cluster import EmbeddedPostgres

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError", "find_bindir"]
