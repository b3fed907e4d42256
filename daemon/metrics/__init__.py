"""Every `jobd_*` metric, on one registry per daemon, and what feeds them.

Three kinds of source, three ways in:

- events (a job started, finished, errored; an actor restarted) come through
  `PromObserver`, which implements `actors.ports.Observer`: each hook is a dict lookup
  and an increment on a plain-Python accumulator, and never raises;
- this daemon's live state (running jobs, mailbox depths, readiness) is read by a
  collector at scrape time from callables the daemon hands in: cheap, always fresh;
- database-derived gauges are computed off the scrape path by `run_queue_gauges`, on
  the one daemon per database that the Peer (`actors.services.peer`) says leads.

The modules:

- `names`: bucket bounds, outcome and state label values, `KeyLabels` (the bound on
  the `key` label);
- `accumulators`: `Counter` and `Histogram`, exported as prometheus_client would;
- `registry`: `Metrics`, the registry with every metric's name, help and labels;
- `observer`: `PromObserver`, the Observer hooks behind one never-raise wrapper;
- `collectors`: the scrape-time gauges (live state, and the leader's last values);
- `gauges`: `run_queue_gauges`, the leader's refresh loop.
"""

from daemon.metrics.gauges import run_queue_gauges
from daemon.metrics.names import (
    BATCH_BUCKETS,
    DB_BUCKETS,
    GAUGE_STATES,
    JOB_BUCKETS,
    LAG_BUCKETS,
    OTHER_KEY,
    OUTCOMES,
    KeyLabels,
)
from daemon.metrics.observer import PromObserver
from daemon.metrics.registry import Metrics

__all__ = [
    "BATCH_BUCKETS",
    "DB_BUCKETS",
    "GAUGE_STATES",
    "JOB_BUCKETS",
    "LAG_BUCKETS",
    "OTHER_KEY",
    "OUTCOMES",
    "KeyLabels",
    "Metrics",
    "PromObserver",
    "run_queue_gauges",
]
