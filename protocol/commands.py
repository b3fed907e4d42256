"""Every command a client may send, and the result type each one answers with.

On the socket a request is one line: `{"id": 7, "type": "get", "job_id": 42}`; the
reply echoes the id: `{"id": 7, "type": "ok", "result": {...}}` or
`{"id": 7, "type": "error", "code": "not_found", "message": "...", "details": {}}`.
Unknown fields are ignored so newer clients can talk to older daemons. Every field
has a type and a range (protocol/jobs.py): a request outside them is `bad_request`
naming the field, on the socket and over HTTP alike.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from protocol.callbacks import (
    CallbackResult,
    JobComplete,
    JobFail,
    JobHeartbeat,
    JobProgress,
)
from protocol.events import MAX_EVENTS_BATCH, EventName, EventSpec, EventView, IdempotencyKey
from protocol.jobs import (
    DaemonView,
    JobId,
    JobSpec,
    JobState,
    JobView,
    Key,
    KeyStats,
    QueueCounts,
    QueueName,
    text,
)
from protocol.schedules import ScheduleName, ScheduleSpec, ScheduleView
from protocol.tree import TreeNode
from protocol.webhooks import DeliveryState, DeliveryView, WebhookName
from protocol.workflows import WorkflowView

MAX_BATCH = 100_000  # jobs per enqueue_batch, ids per filter
# A filter value is only compared, never stored: bounded by the longest value a job can hold.
FilterText = text(1024)


class _Command(msgspec.Struct, tag_field="type", kw_only=True):
    id: Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)] | None = None

    mutating = False


class Hello(_Command, tag="hello"):
    protocol: Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]
    client: text(200) = ""  # type: ignore[valid-type]


class Ping(_Command, tag="ping"):
    pass


class Tree(_Command, tag="tree"):
    pass


class Enqueue(_Command, tag="enqueue"):
    job: JobSpec
    mutating = True


class EnqueueBatch(_Command, tag="enqueue_batch"):
    jobs: Annotated[list[JobSpec], msgspec.Meta(max_length=MAX_BATCH)]
    mutating = True


class Get(_Command, tag="get"):
    job_id: JobId


class Cancel(_Command, tag="cancel"):
    job_id: JobId
    mutating = True


class Stats(_Command, tag="stats"):
    """Job counts per queue and state. `finished: false` counts only the unfinished
    states (from their partial indexes, cheap at any table size); the finished ones are
    a scan of the whole table, ~150 ms per million jobs (the dashboard's overview takes
    the last hour's from `activity` instead)."""

    finished: bool = True


class Inspect(_Command, tag="inspect"):
    """One run in detail (the dashboard's run page): the job whole, its steps with their
    results, what it waits for, its parent, children and the event that started it."""

    job_id: JobId


class Activity(_Command, tag="activity"):
    """The last hour per queue in five-minute buckets: jobs completed and failed, and
    how long the oldest available job has waited."""


class Nodes(_Command, tag="nodes"):
    pass


class Filtered(_Command, kw_only=True):
    """Selects jobs; every field narrows the match, `ids` names jobs outright."""

    ids: Annotated[list[JobId], msgspec.Meta(max_length=MAX_BATCH)] | None = None
    queue: FilterText | None = None  # type: ignore[valid-type]
    kind: FilterText | None = None  # type: ignore[valid-type]
    state: list[JobState] | None = None  # any other state is refused, naming the valid ones
    key: FilterText | None = None  # type: ignore[valid-type]
    tag: FilterText | None = None  # type: ignore[valid-type]
    unique_key: FilterText | None = None  # type: ignore[valid-type]
    created_after: datetime | None = None
    created_before: datetime | None = None
    finished_after: datetime | None = None
    finished_before: datetime | None = None
    # Text in any attempt's error message or traceback: any case, literal (% and _ are
    # plain characters); "" matches every job that has an attempt error.
    error: FilterText | None = None  # type: ignore[valid-type]

    def has_filter(self) -> bool:
        return any(getattr(self, f) is not None for f in FILTER_FIELDS)

    def filter_values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f) for f in FILTER_FIELDS)


FILTER_FIELDS = (
    "ids", "queue", "kind", "state", "key", "tag", "unique_key",
    "created_after", "created_before", "finished_after", "finished_before", "error",
)


class List(Filtered, tag="list"):
    """Newest first; pass the reply's `next_cursor` back as `cursor` for the next page."""

    cursor: JobId | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50


class Summary(Filtered, tag="summary"):
    """Counts per state for the matching jobs (e.g. one day's batch, by tag)."""


class _Bulk(Filtered, kw_only=True):
    dry_run: bool = False
    mutating = True


class CancelMany(_Bulk, tag="cancel_many"):
    pass


class Retry(_Bulk, tag="retry"):
    """Failed, cancelled or scheduled jobs run again now (attempts are topped up)."""


class Replay(_Bulk, tag="replay"):
    """A new job with the same kind, args and options for each finished match."""


class Delete(_Bulk, tag="delete"):
    """Removes matching jobs that are not running."""


class Pause(_Command, tag="pause"):
    """Refused (not_found) for a queue no live daemon serves and this daemon's config
    and handlers do not declare: a typo would otherwise pause nothing, silently."""

    queue: QueueName
    key: Key | None = None
    mutating = True


class Resume(_Command, tag="resume"):
    queue: QueueName
    key: Key | None = None
    mutating = True


class Drain(_Command, tag="drain"):
    """Stop (or with undo, restart) claiming on this daemon; running jobs go on."""

    undo: bool = False
    mutating = True


class Reload(_Command, tag="reload"):
    mutating = True


class SendEvent(_Command, tag="send_event"):
    """Starts every function subscribed to `name` (one job each, the data as its args),
    cancels the jobs whose cancel_on it matches, and wakes every workflow waiting for it
    whose match the data contains. With an `idempotency_key`, a repeat within
    `events.dedup_window` answers the first event's id, created false, and does nothing."""

    name: EventName
    data: dict[str, Any] = {}  # at most limits.max_args_bytes, JSON-encoded
    idempotency_key: IdempotencyKey | None = None
    mutating = True


class SendEvents(_Command, tag="send_events"):
    """Many events in one round trip and one transaction, in order."""

    events: Annotated[list[EventSpec], msgspec.Meta(max_length=MAX_EVENTS_BATCH)]
    mutating = True


class ListEvents(_Command, tag="list_events"):
    """Newest first; pass `next_cursor` back as `cursor` for the next page."""

    name: EventName | None = None
    cursor: JobId | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50


class SendEventResult(msgspec.Struct, kw_only=True):
    """`id` is the event's (the first one's, for a repeat); `started` the jobs it
    created, `cancelled` the jobs its cancel_on matched (running ones are being
    stopped), `woken` the workflows waiting for it."""

    id: int
    woken: list[int]
    created: bool = True
    started: list[int] = []
    cancelled: list[int] = []


class SendEventsResult(msgspec.Struct, kw_only=True):
    events: list[SendEventResult]


class EventsPage(msgspec.Struct, kw_only=True):
    events: list[EventView]
    next_cursor: int | None


class Watch(_Command, tag="watch"):
    """Streams the job each time it changes, until it is finished."""

    job_id: JobId
    interval_s: Annotated[float, msgspec.Meta(ge=0.05, le=60)] = 0.5


class ScheduleAdd(_Command, tag="schedule_add"):
    schedule: ScheduleSpec
    replace: bool = False  # overwrite an existing definition (paused state and history stay)
    mutating = True


class ScheduleRemove(_Command, tag="schedule_remove"):
    name: ScheduleName
    mutating = True


class SchedulePause(_Command, tag="schedule_pause"):
    name: ScheduleName
    mutating = True


class ScheduleResume(_Command, tag="schedule_resume"):
    name: ScheduleName
    mutating = True


class ScheduleTrigger(_Command, tag="schedule_trigger"):
    """Fire one extra occurrence now; `at` names the occurrence (default: now)."""

    name: ScheduleName
    at: datetime | None = None
    mutating = True


class ScheduleList(_Command, tag="schedule_list"):
    pass


class WebhookList(_Command, tag="webhook_list"):
    """Webhook outbox rows, newest first; `state = "failed"` is `jobctl webhooks list --failed`."""

    state: DeliveryState | None = None
    webhook: WebhookName | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 50
    cursor: JobId | None = None  # next_cursor of the previous page


class WebhookReplay(_Command, tag="webhook_replay"):
    """Send outbox rows again from a fresh retry window: by id, or every failed row."""

    ids: Annotated[list[JobId], msgspec.Meta(max_length=MAX_BATCH)] = []
    failed: bool = False
    mutating = True


Command = (
    Hello | Ping | Tree | Enqueue | EnqueueBatch | Get | Cancel | Stats | Nodes
    | Inspect | Activity
    | List | Summary | CancelMany | Retry | Replay | Delete | Pause | Resume | Drain | Reload
    | Watch
    | ScheduleAdd | ScheduleRemove | SchedulePause | ScheduleResume | ScheduleTrigger
    | ScheduleList | SendEvent | SendEvents | ListEvents | WebhookList | WebhookReplay
    | JobComplete | JobFail | JobProgress | JobHeartbeat
)


# -- results ---------------------------------------------------------------------------


class HelloResult(msgspec.Struct, kw_only=True):
    protocol: int
    server: str
    commands: list[str]


class Pong(msgspec.Struct, kw_only=True):
    daemon_id: str
    region: str
    version: str
    ready: bool
    draining: bool


class EnqueueResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: int
    created: bool
    # For a kind with flow-control tools, what they did: created | debounced | replaced |
    # batched (id: the batch job) | duplicate | skipped_throttle | skipped_singleton
    # (id: the `skipped` row).
    outcome: str | None = None
    # Set when no live daemon serves the job's queue: it waits until one does.
    warning: str | None = None


class BatchResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    ids: list[int]
    created: int
    # Per job, as EnqueueResult.outcome; only when some job's kind has tools.
    outcomes: list[str | None] | None = None
    warning: str | None = None


class CancelResult(msgspec.Struct, kw_only=True):
    id: int
    was: str
    state: str  # "cancelled", or "cancelling" while a running attempt is being stopped


class StatsResult(msgspec.Struct, kw_only=True):
    queues: list[QueueCounts]
    keys: list[KeyStats] = []


class NodesResult(msgspec.Struct, kw_only=True):
    daemons: list[DaemonView]


class JobsPage(msgspec.Struct, kw_only=True):
    jobs: list[JobView]
    next_cursor: int | None


class SummaryResult(msgspec.Struct, kw_only=True):
    total: int
    queued: int  # scheduled + available + waiting
    running: int
    completed: int
    failed: int
    cancelled: int
    by_state: dict[str, int]


class BulkResult(msgspec.Struct, kw_only=True):
    matched: int
    changed: int
    dry_run: bool
    ids: list[int] = []  # replay: the new jobs' ids


class RunStep(msgspec.Struct, kw_only=True):
    """A workflow step. `result` and `error` over `limits.list_field_bytes` are left out
    (None) and named in `truncated`. A sleep's finished_at is its wake-up time: it is
    done once that has passed."""

    name: str
    done: bool
    attempts: int
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None  # finished_at - started_at (at least 0), once done
    result: Any = None
    error: dict[str, Any] | None = None
    truncated: list[str] = []


class RunEvent(msgspec.Struct, kw_only=True):
    id: int
    name: str
    sent_at: datetime


class RunDetail(msgspec.Struct, kw_only=True):
    """`job` is whole, as `get` shows it; `children` are list views (large fields left
    out, named in each one's `truncated`): the first MAX_INSPECT_CHILDREN by id of
    `children_total`. `event` is None when no event started the job or it was pruned."""

    job: JobView
    steps: list[RunStep]
    steps_total: int
    waiting_on: dict[str, Any] | None  # while the job is `waiting`
    parent_id: int | None
    children: list[JobView]
    children_total: int
    event: RunEvent | None


MAX_INSPECT_CHILDREN = 100
# A reply stays bounded however long the workflow: at most ~8 MiB of steps (each one's
# result and error cut at list_field_bytes), well under the client's reply cap.
MAX_INSPECT_STEPS = 1000
ACTIVITY_BUCKETS = 12
ACTIVITY_BUCKET_S = 300


class QueueActivity(msgspec.Struct, kw_only=True):
    """`completed[i]` and `failed[i]`: jobs that finished so in bucket i (oldest first).
    The oldest available job is the head of the queue: due (run_at passed) and not
    claimed yet; `oldest_wait_s` is how long since its run_at."""

    queue: str
    completed: list[int]
    failed: list[int]
    oldest_available_id: int | None = None
    oldest_available_run_at: datetime | None = None
    oldest_wait_s: float | None = None


class ActivityResult(msgspec.Struct, kw_only=True):
    """Buckets are aligned to five minutes (the last one is still filling): stable
    across refreshes. `bucket_starts` has one time per bucket, oldest first."""

    now: datetime
    bucket_s: int
    bucket_starts: list[datetime]
    queues: list[QueueActivity]


class PauseResult(msgspec.Struct, kw_only=True):
    queue: str
    key: str | None
    paused: bool


class DrainResult(msgspec.Struct, kw_only=True):
    daemon_id: str
    draining: bool


class ReloadResult(msgspec.Struct, kw_only=True):
    ok: bool
    message: str


class WebhooksPage(msgspec.Struct, kw_only=True):
    deliveries: list[DeliveryView]
    next_cursor: int | None


class WebhookReplayResult(msgspec.Struct, kw_only=True):
    replayed: list[int]  # rows pending again
    # Asked for by id but not replayed: no such row, or no daemon declares its webhook.
    refused: list[int] = []


class ScheduleListResult(msgspec.Struct, kw_only=True):
    schedules: list[ScheduleView]


class ScheduleRemoved(msgspec.Struct, kw_only=True):
    name: str


class ScheduleFired(msgspec.Struct, kw_only=True):
    name: str
    fire_at: datetime
    job_id: int | None  # None: this occurrence had already fired
    created: bool


RESULT_TYPES: dict[type, Any] = {
    Hello: HelloResult,
    Ping: Pong,
    Tree: TreeNode,
    Enqueue: EnqueueResult,
    EnqueueBatch: BatchResult,
    Get: WorkflowView,
    SendEvent: SendEventResult,
    SendEvents: SendEventsResult,
    ListEvents: EventsPage,
    Cancel: CancelResult,
    Stats: StatsResult,
    Nodes: NodesResult,
    Inspect: RunDetail,
    Activity: ActivityResult,
    List: JobsPage,
    Summary: SummaryResult,
    CancelMany: BulkResult,
    Retry: BulkResult,
    Replay: BulkResult,
    Delete: BulkResult,
    Pause: PauseResult,
    Resume: PauseResult,
    Drain: DrainResult,
    Reload: ReloadResult,
    Watch: JobView,
    ScheduleAdd: ScheduleView,
    ScheduleRemove: ScheduleRemoved,
    SchedulePause: ScheduleView,
    ScheduleResume: ScheduleView,
    ScheduleTrigger: ScheduleFired,
    ScheduleList: ScheduleListResult,
    WebhookList: WebhooksPage,
    WebhookReplay: WebhookReplayResult,
    JobComplete: CallbackResult,
    JobFail: CallbackResult,
    JobProgress: CallbackResult,
    JobHeartbeat: CallbackResult,
}

COMMAND_NAMES = sorted(c.__struct_config__.tag for c in RESULT_TYPES)  # type: ignore[attr-defined]


# -- reply envelopes -------------------------------------------------------------------


class Ok(msgspec.Struct, tag_field="type", tag="ok", kw_only=True):
    id: int | None = None
    result: Any = None
    more: bool = False  # streaming replies: more frames follow


class Error(msgspec.Struct, tag_field="type", tag="error", kw_only=True):
    id: int | None = None
    code: str
    message: str
    details: dict[str, Any] = {}


Reply = Ok | Error


class _Envelope(msgspec.Struct):
    """Just enough of a request to answer it even when the rest fails to decode."""

    id: int | None = None
    type: str | None = None


class JsonDecoder:
    """msgspec.json.Decoder, but JSON nested past msgspec's depth limit is a DecodeError
    (answered bad_json) rather than a RecursionError (which answered internal)."""

    def __init__(self, type_: Any):
        self._decoder = msgspec.json.Decoder(type_)

    def decode(self, data: bytes | str) -> Any:
        try:
            return self._decoder.decode(data)
        except RecursionError:
            raise msgspec.DecodeError("JSON is nested too deeply") from None


command_decoder = JsonDecoder(Command)
envelope_decoder = JsonDecoder(_Envelope)
reply_decoder = JsonDecoder(Reply)
