"""Functions that events start (README: "Events and flow control").

- A capture per marketplace: each marketplace's feed sends `marketplace/capture` with
  its name; the capture runs keyed by marketplace (so its flow-control limits apply per
  marketplace), and UK captures also get a VAT check.
- A prediction per user request: `prediction/requested` starts one; the user pressing
  cancel sends `prediction/cancelled` with the same user_id, which cancels the request
  whether it waits, runs or sleeps.

Send them from the shell (`jobctl send-event marketplace/capture --data
'{"marketplace": "ebay"}' --id capture:ebay:2026-12-03`), from Python
(`client.send_event(...)`), over HTTP (`POST /v1/send_event`) or from SQL inside your
own transaction (`SELECT * FROM jobd.send_event('prediction/requested', '{...}')`).
"""

from __future__ import annotations

import msgspec
import trio
import trio.lowlevel

from actors import Context, job


class CaptureArgs(msgspec.Struct):
    marketplace: str
    region: str = "us"
    pages: int = 3


# `key` is a path into the event's data: the jobs are created in Postgres, where a
# Python key function cannot run.
@job("marketplace.capture", queue="crawl", on_event="marketplace/capture", key="marketplace",
     timeout="10m", max_attempts=5)
async def capture(ctx: Context, args: CaptureArgs) -> dict:
    listings = 0
    for page in range(args.pages):
        listings += await ctx.step(f"page:{page}", _fetch_page, args.marketplace, page)
        ctx.progress(100 * (page + 1) / args.pages, f"page {page + 1}/{args.pages}")
    return {"marketplace": args.marketplace, "listings": listings}


@job("marketplace.vat_check", queue="crawl", key="marketplace",
     on_event={"event": "marketplace/capture", "match": {"region": "uk"}})
async def vat_check(ctx: Context, args: CaptureArgs) -> dict:
    return {"marketplace": args.marketplace, "vat_checked": True}


class PredictionArgs(msgspec.Struct):
    user_id: str
    question: str
    model: str = "smart-1"
    think_s: float = 0.0  # how long the stand-in model takes


@job("prediction.run", queue="models", on_event="prediction/requested", key="model",
     cancel_on=[{"event": "prediction/cancelled", "match": "user_id"}],
     timeout="15m", max_attempts=3)
async def predict(ctx: Context, args: PredictionArgs) -> dict:
    answer = await ctx.step("predict", _predict, args.model, args.question, args.think_s)
    return {"user_id": args.user_id, "answer": answer}


async def _fetch_page(marketplace: str, page: int) -> int:
    await trio.lowlevel.checkpoint()  # a real capture calls the marketplace's API here
    return 10 + page


async def _predict(model: str, question: str, think_s: float) -> str:
    await trio.sleep(think_s)  # a real one calls the model's API here
    return f"{model}: {len(question)} characters considered"
