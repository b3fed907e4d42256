"""Handlers for tests/e2e/test_dashboard_http.py: one that completes, one that fails with
a recognisable traceback, and a workflow with steps and a child that fails its first
attempt only."""

from __future__ import annotations

import msgspec

from actors import Context, job
from actors.workflow import Child


class Note(msgspec.Struct):
    text: str = ""


@job("dash.ok", queue="dash")
async def ok(ctx: Context, args: Note) -> dict:
    return {"echo": args.text}


@job("dash.fail", queue="dash", max_attempts=1)
async def fail(ctx: Context, args: Note) -> None:
    raise ValueError(f"boom 100% {args.text}")


@job("dash.child", queue="dash")
async def child(ctx: Context, args: Note) -> str:
    return args.text.upper()


@job("dash.flow", queue="dash", max_attempts=1)
async def flow(ctx: Context, args: Note) -> dict:
    fetched = await ctx.step("fetch", lambda: {"rows": 3})
    ids = await ctx.spawn_many([Child(kind="dash.child", args={"text": "kid"})], name="kids")
    kids = await ctx.gather(ids, name="kids")
    if ctx.job.attempt == 1 and args.text == "fail-first":
        raise RuntimeError("first attempt fails on purpose")
    return {"fetched": fetched, "kids": kids}


class Order(msgspec.Struct):
    order: str = ""


@job("dash.approval", queue="dash", on_event="dash/order.placed")
async def approval(ctx: Context, args: Order) -> dict:
    """Started by an event; then waits for another one that names its order."""
    approved = await ctx.wait_for_event("dash/order.approved", match={"order": args.order},
                                        timeout="1h")
    return {"approved_by": (approved or {}).get("by")}
