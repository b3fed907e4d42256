"""PgStore's control-plane statements (sql/control.py): pages, summaries and bulk
operations over one job filter, and pauses."""

from __future__ import annotations

from typing import Any

from daemon.store.base import StoreBase
from daemon.store.sql import control as sql
from protocol.commands import Filtered


class ControlStatements(StoreBase):
    async def list_jobs(
        self, where: Filtered, cursor: int | None, limit: int, field_bytes: int = 4096
    ) -> list[dict[str, Any]]:
        """A page; args/result/errors over `field_bytes` are left out, named in `truncated`."""
        rows = await self._fetch(sql.LIST_JOBS, *where.filter_values(), cursor, limit,
                                 field_bytes, op="list")
        return [dict(r) for r in rows]

    async def summarize(self, where: Filtered) -> dict[str, int]:
        rows = await self._fetch(sql.SUMMARIZE_JOBS, *where.filter_values(), op="summary")
        return {r["state"]: r["n"] for r in rows}

    async def cancel_matching(self, where: Filtered, dry_run: bool) -> tuple[int, int]:
        return await self._bulk(sql.CANCEL_MATCHING, where, dry_run)

    async def retry_matching(self, where: Filtered, dry_run: bool) -> tuple[int, int]:
        return await self._bulk(sql.RETRY_MATCHING, where, dry_run)

    async def delete_matching(self, where: Filtered, dry_run: bool) -> tuple[int, int]:
        return await self._bulk(sql.DELETE_MATCHING, where, dry_run)

    async def _bulk(self, statement: str, where: Filtered, dry_run: bool) -> tuple[int, int]:
        row = (await self._fetch(statement, *where.filter_values(), dry_run, op="bulk"))[0]
        return row["matched"], row["changed"]

    async def replay_matching(self, where: Filtered, dry_run: bool) -> tuple[int, list[int]]:
        row = (await self._fetch(sql.REPLAY_MATCHING, *where.filter_values(), dry_run,
                                 op="bulk"))[0]
        return row["matched"], list(row["ids"])

    async def pause(self, queue: str, key: str | None) -> None:
        await self._execute(sql.PAUSE, queue, key, op="pause")

    async def resume(self, queue: str, key: str | None) -> None:
        await self._execute(sql.RESUME, queue, key, op="pause")

    async def list_pauses(self) -> list[tuple[str, str]]:
        return [(r["queue"], r["key"]) for r in await self._fetch(sql.LIST_PAUSES, op="pause")]
