"""PgStore: jobd's only door to Postgres, implementing `actors.ports.Store`.

One thin method per named statement (`daemon/store/sql/`, one module per subject), grouped
by subject in mixins that share one road to the database (`base.StoreBase`): jobs, leases
and daemons, flow control, the control plane, the dashboard's run reads, schedules,
workflows, webhooks, events, HTTP callbacks; plus the three things that hold a connection of their own: the LISTEN
connection (`listen`), the handler transaction (`transaction`) and the metrics leader's
session (`leader`).
"""

from __future__ import annotations

from actors.ports import Store
from daemon.store.callbacks import CallbackStatements
from daemon.store.control import ControlStatements
from daemon.store.events import EventStatements
from daemon.store.flow import FlowStatements
from daemon.store.jobs import JobStatements
from daemon.store.leader import MetricsSession, MetricsSessions
from daemon.store.leases import LeaseStatements
from daemon.store.listen import Listening
from daemon.store.runs import RunStatements
from daemon.store.schedules import ScheduleStatements
from daemon.store.transaction import HandlerTransaction, LeaseLost, Transactions
from daemon.store.webhooks import WebhookStatements
from daemon.store.workflows import WorkflowStatements

__all__ = ["HandlerTransaction", "LeaseLost", "MetricsSession", "PgStore"]


class PgStore(
    JobStatements,
    LeaseStatements,
    FlowStatements,
    ControlStatements,
    RunStatements,
    ScheduleStatements,
    WorkflowStatements,
    WebhookStatements,
    EventStatements,
    CallbackStatements,
    Transactions,
    Listening,
    MetricsSessions,
):
    """Construct with the database URL and pool sizes (StoreBase), then `connect()`."""


# The type check that keeps PgStore and the port in step (mypy, .ci/run).
_: type[Store] = PgStore
