"""Each page's data (the control commands it asks) and each action's command."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from daemon.api.requests import Peer
from daemon.dashboard import forms
from daemon.dashboard.render import Renderer
from protocol import commands as c
from protocol.errors import BadRequest, NotFound

Ask = Callable[..., Awaitable[Any]]

UNFINISHED = ("scheduled", "available", "running", "waiting")
STATES = ("scheduled", "available", "running", "waiting", "completed", "failed", "cancelled",
          "skipped")
BULK_ACTIONS = {"cancel": c.CancelMany, "retry": c.Retry, "replay": c.Replay,
                "delete": c.Delete}
SCHEDULE_ACTIONS = {"pause": c.SchedulePause, "resume": c.ScheduleResume,
                    "trigger": c.ScheduleTrigger}

_NOT_LIVE = {"error", "created_before", "finished_before"}
_RUN = re.compile(r"^/runs/([0-9]{1,19})$")
_RUN_ACTION = re.compile(r"^/runs/([0-9]{1,19})/(cancel|retry|replay|delete)$")
_SCHEDULE_ACTION = re.compile(r"^/schedules/(pause|resume|trigger)$")


class Redirect(Exception):
    """Answer 303 to `location` (after an action: the page it changed)."""

    def __init__(self, location: str, flash: str = ""):
        self.location = location
        self.flash = flash


class Pages:
    def __init__(self, ask: Ask, render: Renderer):
        self._ask = ask
        self._render = render

    async def get(self, rest: str, query: list[tuple[str, str]], ctx: dict[str, Any]) -> str:
        if rest == "/":
            return await self.overview(ctx)
        if rest == "/runs":
            return await self.runs(query, ctx)
        if match := _RUN.match(rest):
            return await self.run(int(match.group(1)), ctx)
        if rest == "/schedules":
            return await self.schedules(ctx)
        if rest == "/daemons":
            return await self.daemons(ctx)
        raise NotFound(f"no page {rest[:100]}")

    async def post(self, rest: str, fields: list[tuple[str, str]], ctx: dict[str, Any],
                   peer: Peer) -> str:
        form = dict(fields)
        if match := _RUN_ACTION.match(rest):
            return await self.run_action(int(match.group(1)), match.group(2), peer)
        if rest == "/runs/bulk":
            return await self.bulk(fields, ctx, peer)
        if rest in ("/pause", "/resume"):
            kind = c.Pause if rest == "/pause" else c.Resume
            cmd = forms.command(kind, {"queue": form.get("queue", ""),
                                       "key": form.get("key") or None})
            await self._ask(cmd, peer)
            what = f"{cmd.queue}/{cmd.key}" if cmd.key else cmd.queue
            raise Redirect(forms.dashboard_path(form.get("back")), f"{rest[1:]}d {what}")
        if match := _SCHEDULE_ACTION.match(rest):
            action = match.group(1)
            cmd = forms.command(SCHEDULE_ACTIONS[action], {"name": form.get("name", "")})
            result = await self._ask(cmd, peer)
            done = (f"fired {cmd.name}: job {result.job_id}" if action == "trigger"
                    else f"{action}d {cmd.name}")
            raise Redirect("/ui/schedules", done)
        raise NotFound(f"no action {rest[:100]}")

    async def overview(self, ctx: dict[str, Any]) -> str:
        # Unfinished counts only: the finished ones are a whole-table count (~150 ms per
        # million jobs) every refresh; the last hour's come from activity.
        stats = await self._ask(c.Stats(finished=False))
        paused = {(q.queue, k) for q in stats.queues for k in q.paused_keys}
        keys = [{"queue": k.queue, "key": k.key, "id": f"{k.queue}/{k.key}", "stats": k,
                 "paused": (k.queue, k.key) in paused} for k in stats.keys]
        listed = {(k.queue, k.key) for k in stats.keys}
        # A key paused by hand in a queue without per-key limits has no stats row.
        keys += [{"queue": q, "key": k, "id": f"{q}/{k}", "stats": None, "paused": True}
                 for q, k in sorted(paused - listed)]
        activity = await self._ask(c.Activity())
        hour = {a.queue: {"finished": sum(a.completed) + sum(a.failed),
                          "completed": sum(a.completed), "failed": sum(a.failed),
                          "oldest_available_id": a.oldest_available_id,
                          "oldest_available_at": a.oldest_available_run_at}
                for a in activity.queues}
        queues = sorted({q.queue for q in stats.queues} | set(hour))
        counts = {q.queue: q for q in stats.queues}
        return self._render.page("overview.html", ctx, queues=queues, counts=counts, keys=keys,
                                 states=UNFINISHED,
                                 activity=hour, activity_since=activity.bucket_starts[0],
                                 since=activity.bucket_starts[0].isoformat(),
                                 nav="overview")

    async def runs(self, query: list[tuple[str, str]], ctx: dict[str, Any]) -> str:
        chosen = forms.filters(query)
        limit = forms.integer(query, "limit", 50)
        cursor = forms.integer(query, "cursor")
        page = await self._ask(forms.command(c.List, {**chosen, "limit": limit,
                                                      "cursor": cursor}))
        next_link = None
        if page.next_cursor is not None:
            next_link = "/ui/runs?" + forms.query(chosen, limit=limit, cursor=page.next_cursor)
        return self._render.page(
            "runs.html", ctx, page=page, chosen=chosen, states=STATES, limit=limit,
            sizes=forms.PAGE_SIZES, next_link=next_link,
            newest_link="/ui/runs?" + forms.query(chosen, limit=limit), filters=forms.FILTERS,
            bulk_actions=list(BULK_ACTIONS), first_page=cursor is None,
            # Text in the error is a scan, and an end time far back walks the id index
            # to it (README "Known limits"): not every 2 s. Both look at the past anyway.
            polling=cursor is None and not chosen.keys() & _NOT_LIVE, nav="runs")

    async def run(self, job_id: int, ctx: dict[str, Any]) -> str:
        run = await self._ask(forms.command(c.Inspect, {"job_id": job_id}))
        return self._render.page("run.html", ctx, run=run, job=run.job,
                                 polling=run.job.state in UNFINISHED, nav="runs")

    async def schedules(self, ctx: dict[str, Any]) -> str:
        listing = await self._ask(c.ScheduleList())
        return self._render.page("schedules.html", ctx, schedules=listing.schedules,
                                 nav="schedules")

    async def daemons(self, ctx: dict[str, Any]) -> str:
        nodes = await self._ask(c.Nodes())
        tree = await self._ask(c.Tree())
        return self._render.page("daemons.html", ctx, daemons=nodes.daemons, tree=tree,
                                 nav="daemons")

    async def run_action(self, job_id: int, action: str, peer: Peer) -> str:
        if action == "cancel":
            result = await self._ask(forms.command(c.Cancel, {"job_id": job_id}), peer)
            raise Redirect(f"/ui/runs/{job_id}", f"job {job_id}: {result.state}")
        cmd = forms.command(BULK_ACTIONS[action], {"ids": [job_id]})
        result = await self._ask(cmd, peer)
        if action == "replay" and result.ids:
            raise Redirect(f"/ui/runs/{result.ids[0]}", f"replay of job {job_id}")
        if action == "delete" and result.changed:
            raise Redirect("/ui/runs", f"deleted job {job_id}")
        verb = {"retry": "retried", "replay": "replayed", "delete": "deleted"}[action]
        note = f"{verb} job {job_id}" if result.changed else f"job {job_id}: nothing to {action}"
        raise Redirect(f"/ui/runs/{job_id}", note)

    async def bulk(self, fields: list[tuple[str, str]], ctx: dict[str, Any], peer: Peer) -> str:
        form = dict(fields)
        action = form.get("action", "")
        if action not in BULK_ACTIONS:
            raise BadRequest(f"action must be one of {', '.join(BULK_ACTIONS)}, "
                             f"not {action[:40]!r}", details={"field": "action"})
        chosen = forms.filters(fields)
        confirmed = form.get("confirm") == "yes"
        cmd = forms.command(BULK_ACTIONS[action], {**chosen, "dry_run": not confirmed})
        result = await self._ask(cmd, peer)
        if not confirmed:
            return self._render.page("confirm.html", ctx, action=action, chosen=chosen,
                                     result=result, nav="runs",
                                     back="/ui/runs?" + forms.query(chosen))
        raise Redirect("/ui/runs?" + forms.query(chosen),
                       f"{action}: {result.changed} of {result.matched} matching jobs")
