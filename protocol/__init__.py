"""The client API: what a program needs to talk to a running jobd, over its socket.

    from protocol import connect, NotFound

    async with connect("/run/jobd/eu-west/jobd.sock") as client:   # asyncio or trio
        done = await client.enqueue("listings.refresh", {"marketplace": "ebay"})
        job = await client.get(done.id)

Each client method returns one of the result Structs below or raises `JobdError` (a
subclass where the code has one) with a stable `code`. Everything else in this package
(the command Structs, framing, limits) is the wire format the daemon shares; import it
from its module when you need it. This package imports nothing else of jobd's.
"""

from protocol.callbacks import CallbackResult
from protocol.client import Client, SyncClient, connect
from protocol.commands import (
    ActivityResult,
    BatchResult,
    BulkResult,
    CancelResult,
    DrainResult,
    EnqueueResult,
    EventsPage,
    HelloResult,
    JobsPage,
    NodesResult,
    PauseResult,
    Pong,
    QueueActivity,
    ReloadResult,
    RunDetail,
    RunEvent,
    RunStep,
    ScheduleFired,
    ScheduleListResult,
    ScheduleRemoved,
    SendEventResult,
    SendEventsResult,
    StatsResult,
    SummaryResult,
    WebhookReplayResult,
    WebhooksPage,
)
from protocol.errors import (
    BadRequest,
    ConnectionFailed,
    ErrorCode,
    JobdError,
    NotFound,
    Unavailable,
)
from protocol.events import EventSpec, EventView
from protocol.jobs import AttemptError, DaemonView, JobSpec, JobView, KeyStats, QueueCounts
from protocol.schedules import ScheduleSpec, ScheduleView
from protocol.tree import TreeNode
from protocol.webhooks import DeliveryView
from protocol.workflows import ChildView, StepView, WorkflowView

__all__ = [
    # connecting
    "Client", "SyncClient", "connect",
    # errors
    "BadRequest", "ConnectionFailed", "ErrorCode", "JobdError", "NotFound", "Unavailable",
    # what a client sends beside plain arguments
    "JobSpec", "ScheduleSpec",
    # what a client receives
    "AttemptError", "BatchResult", "BulkResult", "CallbackResult", "CancelResult", "ChildView", "DaemonView",
    "DeliveryView", "DrainResult", "EnqueueResult", "HelloResult", "JobView", "JobsPage", "KeyStats",
    "NodesResult", "PauseResult", "Pong", "QueueCounts", "ReloadResult", "ScheduleFired",
    "ScheduleListResult", "ScheduleRemoved", "ScheduleView", "SendEventResult",
    "SendEventsResult", "StatsResult", "StepView", "SummaryResult", "TreeNode",
    "WebhookReplayResult", "WebhooksPage", "WorkflowView",
    # the dashboard's reads
    "ActivityResult", "QueueActivity", "RunDetail", "RunEvent", "RunStep",
    # events
    "EventSpec", "EventView", "EventsPage",
]
