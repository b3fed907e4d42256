"""The dashboard's reads as the control plane answers them: `inspect` (one run in detail)
and `activity` (the last hour per queue), from the store's rows (daemon/store/runs.py)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import msgspec

from actors.services.job_views import job_view
from actors.workflow import maybe_json
from protocol import commands as c
from protocol.errors import NotFound


class _ChildRow(msgspec.Struct, kw_only=True):
    """A child as INSPECT_RUN's JSON carries it: LIST_JOBS' columns (args, result and
    errors as JSON text), so job_view makes the same list view of it."""

    id: int
    queue: str
    kind: str
    args: str | None
    key: str | None
    priority: int
    state: str
    attempt: int
    max_attempts: int
    run_at: datetime
    lease_owner: str | None
    lease_until: datetime | None
    unique_key: str | None
    tags: list[str]
    progress: float | None
    progress_note: str | None
    result: str | None
    errors: str
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    event_id: int | None
    truncated: list[str]


async def run_detail(store: Any, job_id: int, field_bytes: int) -> c.RunDetail:
    row = await store.inspect_run(job_id, field_bytes, c.MAX_INSPECT_CHILDREN,
                                  c.MAX_INSPECT_STEPS)
    if row is None:
        raise NotFound(f"no job {job_id}", details={"id": job_id})
    decode = msgspec.json.decode
    children = decode(row["children"], type=list[_ChildRow])
    return c.RunDetail(
        job=job_view(row),
        steps=decode(row["steps"], type=list[c.RunStep]),
        steps_total=row["steps_total"],
        waiting_on=maybe_json(row["waiting_on"]),
        parent_id=row["parent_id"],
        children=[job_view(msgspec.structs.asdict(child)) for child in children],
        children_total=row["children_total"],
        event=decode(row["event"], type=c.RunEvent) if row["event"] is not None else None,
    )


async def activity(store: Any) -> c.ActivityResult:
    bucket_s, buckets = c.ACTIVITY_BUCKET_S, c.ACTIVITY_BUCKETS
    row = await store.activity(bucket_s, buckets)
    now, since = row["now"], row["since"]
    queues: dict[str, c.QueueActivity] = {}

    def queue(name: str) -> c.QueueActivity:
        if name not in queues:
            queues[name] = c.QueueActivity(queue=name, completed=[0] * buckets,
                                           failed=[0] * buckets)
        return queues[name]

    for name, state, bucket, n in msgspec.json.decode(
            row["finished"], type=list[tuple[str, str, int, int]]):
        if 0 <= bucket < buckets:
            counts = queue(name).completed if state == "completed" else queue(name).failed
            counts[bucket] += n
    for name, head_id, run_at in msgspec.json.decode(
            row["heads"], type=list[tuple[str, int, datetime]]):
        q = queue(name)
        q.oldest_available_id, q.oldest_available_run_at = head_id, run_at
        q.oldest_wait_s = max(0.0, (now - run_at).total_seconds())
    return c.ActivityResult(
        now=now, bucket_s=bucket_s,
        bucket_starts=[since + timedelta(seconds=i * bucket_s) for i in range(buckets)],
        queues=[queues[name] for name in sorted(queues)],
    )
