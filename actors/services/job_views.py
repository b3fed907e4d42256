"""Jobs as a client sees them: store rows turned into `JobView`s and summaries.

List pages and watch frames leave large fields out (naming them in `truncated`), so a
page of jobs with megabyte results stays small; `get` shows a job whole.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol import commands as c
from protocol.jobs import AttemptError, JobView

FINISHED = ("completed", "failed", "cancelled")


def summary(by_state: dict[str, int]) -> c.SummaryResult:
    def n(*states: str) -> int:
        return sum(by_state.get(s, 0) for s in states)

    return c.SummaryResult(
        total=sum(by_state.values()), queued=n("scheduled", "available", "waiting"),
        running=n("running"), completed=n("completed"), failed=n("failed"),
        cancelled=n("cancelled"), by_state=by_state,
    )


def job_view(row: dict[str, Any], *, field_bytes: int | None = None) -> JobView:
    """A job as a client sees it. List rows may come with large fields left out (the SQL
    names them in `truncated`); with `field_bytes` this leaves them out here."""
    decode = msgspec.json.decode
    truncated = list(row.get("truncated") or ())
    raw = {name: row[name] for name in ("args", "result", "errors")}
    note = row["progress_note"]
    if field_bytes is not None:
        for name, value in raw.items():
            if value is not None and _over(value, field_bytes):
                raw[name] = "[]" if name == "errors" else None
                truncated.append(name)
        if note is not None and _over(note, field_bytes):
            note = note[:field_bytes // 4]
            truncated.append("progress_note")
    return JobView(
        id=row["id"], kind=row["kind"], queue=row["queue"], key=row["key"],
        args=decode(raw["args"]) if raw["args"] is not None else None,
        state=row["state"], attempt=row["attempt"],
        max_attempts=row["max_attempts"], priority=row["priority"],
        unique_key=row["unique_key"], tags=list(row["tags"]), progress=row["progress"],
        progress_note=note,
        result=decode(raw["result"]) if raw["result"] is not None else None,
        errors=_errors(raw["errors"]),
        run_at=row["run_at"], created_at=row["created_at"], started_at=row["started_at"],
        finished_at=row["finished_at"], lease_owner=row["lease_owner"],
        cancel_requested=row["cancel_requested"],
        truncated=truncated, event_id=row.get("event_id"),
        callback_deadline=row.get("lease_until") if row["state"] == "running"
        and row["lease_owner"] is None else None,
    )


def _errors(raw: str) -> list[AttemptError]:
    try:
        return msgspec.json.decode(raw, type=list[AttemptError])
    except msgspec.ValidationError:
        # Written by hand (SQL) in another shape: shown as text, not an internal error.
        return [AttemptError(attempt=0, error_class="unknown",
                             message=f"errors not in jobd's shape: {raw[:1000]}")]


def _over(text: str, limit: int) -> bool:
    # More characters than bytes allowed is over for sure; else count the UTF-8 bytes.
    return len(text) > limit or len(text.encode()) > limit
