"""The database-derived gauges, computed off the scrape path and only on the leader.

`jobd_queue_jobs` and `jobd_queue_oldest_available_age_seconds` (and the per-key
gauges) describe the whole database, so exactly one daemon computes and exports them
and `sum()` over instances never double counts: the one the Peer
(`actors.services.peer`) says leads. Their queries run on the leader's own session
(`Leadership.session()`), so they never take a connection from the pool the job path
uses. A non-leader exports no samples for them; `jobd_metrics_leader` says who leads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from actors.ports import GaugeSession, StoreUnavailable
from actors.runtime.clock import Clock
from actors.services.peer import Leadership, NotLeading
from daemon.metrics.registry import Metrics

log = logging.getLogger("jobd.metrics")


G = TypeVar("G", bound=GaugeSession)


async def run_queue_gauges(
    leadership: Leadership[G],
    metrics: Metrics,
    *,
    interval_s: float,
    clock: Clock,
    key_gauges: Callable[[list[dict[str, Any]]], None] | None = None,
    key_limit: int = 200,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """While this daemon leads, refresh the gauges every interval; else wait to lead."""
    gauges = metrics.queue_gauges
    task_status.started()
    while True:
        await leadership.wait(True)
        gauges.leader = True
        log.info("this daemon now computes the queue gauges", extra={"event": "metrics.leader"})
        try:
            while leadership.leading:
                async with leadership.session() as session:
                    counts, oldest = await session.queue_gauges()
                    rows = await session.key_gauges(key_limit) if key_gauges else None
                gauges.update(counts, oldest)
                if key_gauges is not None and rows is not None:
                    key_gauges(rows)
                # The next refresh, or at once out of here when the leadership goes.
                with trio.move_on_after(interval_s):
                    await leadership.wait(False)
        except NotLeading:
            pass  # lost between two refreshes; the Peer said why
        except StoreUnavailable as exc:
            log.warning("queue gauges lost their connection: %s", exc,
                        extra={"event": "metrics.leader_lost"})
        except Exception:  # noqa: BLE001 - observation must never take the daemon down
            log.exception("refreshing the queue gauges failed", extra={"event": "metrics.failed"})
            await clock.sleep(interval_s)  # then again, if this daemon still leads
        finally:
            gauges.clear()
