"""The hidden `jobd.on_failure` job: runs a handler's `on_failure` hook once its job
has failed.

A trigger (0005_workflows.sql) enqueues it in the same transaction that marks the job
`failed`, whichever path did (the worker, the reaper's rescue, a timeout), for kinds
listed in jobd.failure_hooks (each daemon registers its kinds at start). So a crash can
neither lose the hook nor run it before the failure is recorded. The hook gets this
job's Context: its steps are memoized like any step, so a crash mid-hook does not redo
finished steps. It runs at least once per failure (a failed job retried by hand and
failing again runs it again): make its effects idempotent (e.g. a step per refund).
"""

from __future__ import annotations

from typing import Any

import msgspec

from actors.context import Context
from actors.errors import Fail
from actors.handlers import Handlers, job

KIND = "jobd.on_failure"


class HookArgs(msgspec.Struct):
    job_id: int


@job(KIND, max_attempts=10, timeout="1h")
async def run_failure_hook(ctx: Context, args: HookArgs) -> dict[str, Any]:
    row = await ctx.workflow.store.get_job(args.job_id)
    if row is None:
        return {"job_id": args.job_id, "skipped": "job no longer exists"}
    if ctx.handlers is None:
        raise RuntimeError("a failure hook runs in a daemon, which hands it its handlers")
    jobdef = ctx.handlers.lookup(row["kind"])
    if jobdef.on_failure is None:
        return {"job_id": args.job_id, "skipped": "no on_failure hook"}
    if row["state"] != "failed":
        raise Fail(f"job {args.job_id} is {row['state']}, not failed")
    errors = msgspec.json.decode(row["errors"])
    job_args = jobdef.decode_args(row["args"])
    await jobdef.on_failure(ctx, job_args, errors[-1] if errors else None)
    return {"job_id": args.job_id, "hook": "ran"}


def hooked_kinds(handlers: Handlers) -> list[str]:
    """Kinds with an `on_failure` hook (the daemon registers them in jobd.failure_hooks)."""
    return sorted(k for k, d in handlers.registered().items() if d.on_failure is not None)
