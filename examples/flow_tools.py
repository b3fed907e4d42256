"""Flow-control tools in two real shapes (README "Flow-control tools").

- `market.capture`: a marketplace pushes a change notification per listing edit, often
  dozens in a second. Capturing the marketplace once, a few seconds after the burst ends,
  with the newest cursor, is what you want: debounce per marketplace, bounded by
  `debounce_max` so a marketplace that never goes quiet is still captured every minute.
- `daily.digest`: every signup enqueues one small job; the digest handler gets them 100
  at a time (or whatever arrived within 5 s of the first), per day, and writes one row
  per batch instead of one per signup.

Each is started by an event (`jobctl send-event marketplace/changed --data ...`,
`client.send_event(...)`, `SELECT jobd.send_event(...)` in the app's transaction) or by a
plain enqueue of its kind; either way the collapsing happens in Postgres, so every daemon
and every producer shares it.
"""

from __future__ import annotations

import msgspec

from actors import Context, job


class CaptureArgs(msgspec.Struct):
    marketplace: str
    cursor: int = 0  # the newest change the notification saw


@job("market.capture", queue="crawl", on_event="marketplace/changed", debounce="5s",
     debounce_key="marketplace", debounce_max="1m", timeout="10m")
async def capture(ctx: Context, args: CaptureArgs) -> dict:
    # A real capture pages the marketplace from `cursor`; the debounced run gets the args
    # of the last notification of the burst, so it starts from the newest cursor.
    return {"marketplace": args.marketplace, "from_cursor": args.cursor,
            "collapsed_into": ctx.job.id}


class Signup(msgspec.Struct):
    day: str  # "2026-12-03": one digest per day
    email: str
    plan: str = "free"


@job("daily.digest", queue="default", on_event="user/signed_up", batch_size=100,
     batch_timeout="5s", batch_key="day")
async def digest(ctx: Context, signups: list[Signup]) -> dict:
    by_plan: dict[str, int] = {}
    for s in signups:
        by_plan[s.plan] = by_plan.get(s.plan, 0) + 1
    # One statement for the whole batch, committed with the job's completion: a crash
    # re-runs the batch whole, never half of it.
    async with ctx.transaction() as tx:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS signup_digests (day text, job_id bigint, n int, "
            "by_plan jsonb)")
        await tx.execute("INSERT INTO signup_digests VALUES ($1, $2, $3, $4::jsonb)",
                         signups[0].day, ctx.job.id, len(signups), msgspec.json.encode(by_plan).decode())
        result = {"day": signups[0].day, "signups": len(signups), "by_plan": by_plan}
        await tx.complete(result)
    return result
