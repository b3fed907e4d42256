"""Every command a client may send, and the result type each one answers with.

On the socket a request is one line: `{"id": 7, "type": "get", "job_id": 42}`; the
reply echoes the id: `{"id": 7, "type": "ok", "result": {...}}` or
`{"id": 7, "type": "error", "code": "not_found", "message": "...", "details": {}}`.
Unknown fields are ignored so newer clients can talk to older daemons.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol.jobs import DaemonView, JobSpec, JobView, QueueCounts
from protocol.tree import TreeNode


class _Command(msgspec.Struct, tag_field="type", kw_only=True):
    id: int | None = None

    mutating = False


class Hello(_Command, tag="hello"):
    protocol: int
    client: str = ""


class Ping(_Command, tag="ping"):
    pass


class Tree(_Command, tag="tree"):
    pass


class Enqueue(_Command, tag="enqueue"):
    job: JobSpec
    mutating = True


class EnqueueBatch(_Command, tag="enqueue_batch"):
    jobs: list[JobSpec]
    mutating = True


class Get(_Command, tag="get"):
    job_id: int


class Cancel(_Command, tag="cancel"):
    job_id: int
    mutating = True


class Stats(_Command, tag="stats"):
    pass


class Nodes(_Command, tag="nodes"):
    pass


Command = Hello | Ping | Tree | Enqueue | EnqueueBatch | Get | Cancel | Stats | Nodes


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


class EnqueueResult(msgspec.Struct, kw_only=True):
    id: int
    created: bool


class BatchResult(msgspec.Struct, kw_only=True):
    ids: list[int]
    created: int


class CancelResult(msgspec.Struct, kw_only=True):
    id: int
    was: str
    state: str  # "cancelled", or "cancelling" while a running attempt is being stopped


class StatsResult(msgspec.Struct, kw_only=True):
    queues: list[QueueCounts]


class NodesResult(msgspec.Struct, kw_only=True):
    daemons: list[DaemonView]


RESULT_TYPES: dict[type, Any] = {
    Hello: HelloResult,
    Ping: Pong,
    Tree: TreeNode,
    Enqueue: EnqueueResult,
    EnqueueBatch: BatchResult,
    Get: JobView,
    Cancel: CancelResult,
    Stats: StatsResult,
    Nodes: NodesResult,
}

COMMAND_NAMES = sorted(c.__struct_config__.tag for c in RESULT_TYPES)


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


command_decoder = msgspec.json.Decoder(Command)
envelope_decoder = msgspec.json.Decoder(_Envelope)
reply_decoder = msgspec.json.Decoder(Reply)
