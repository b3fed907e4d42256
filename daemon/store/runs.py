"""PgStore's dashboard reads (sql/runs.py): one run in detail, the last hour per queue."""

from __future__ import annotations

from typing import Any

from daemon.store.base import StoreBase
from daemon.store.sql import runs as sql


class RunStatements(StoreBase):
    async def inspect_run(self, job_id: int, field_bytes: int, children: int,
                          steps: int) -> dict[str, Any] | None:
        """The job's row (as get_job) plus `waiting_on`, `steps`, `children` and `event`
        as JSON text and `steps_total`, `children_total`; None: no such job."""
        rows = await self._fetch(sql.INSPECT_RUN, job_id, field_bytes, children, steps,
                                 op="inspect")
        return dict(rows[0]) if rows else None

    async def activity(self, bucket_s: int, buckets: int) -> dict[str, Any]:
        """`now`, `since` (the first bucket's start), and as JSON text `finished`
        ([queue, state, bucket, n], ...) and `heads` ([queue, id, run_at], ...)."""
        return dict((await self._fetch(sql.ACTIVITY, bucket_s, buckets, op="activity"))[0])
