"""PgStore's statements for an HTTP handler's callbacks (sql/callbacks.py)."""

from __future__ import annotations

from typing import Any

from daemon.store.base import StoreBase
from daemon.store.sql import callbacks as sql


class CallbackStatements(StoreBase):
    async def callback_target(self, job_id: int) -> dict[str, Any] | None:
        rows = await self._fetch(sql.CALLBACK_TARGET, job_id, op="callback")
        return dict(rows[0]) if rows else None

    async def renew_callback(self, job_id: int, token: int, pct: float | None,
                             note: str | None, extend_s: float) -> dict[str, Any] | None:
        """The renewed deadline and whether the job is detached; None if the attempt no
        longer holds the job."""
        rows = await self._fetch(sql.CALLBACK_RENEW, job_id, token, pct, note, extend_s,
                                 op="callback")
        return dict(rows[0]) if rows else None
