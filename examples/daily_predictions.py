"""The daily fan-out: a schedule fires one job a day, which enqueues every
prompt × model × run for that day as children keyed by the date.

    jobd run --config examples/daily_predictions.toml
    jobctl schedules trigger daily-predictions --at 2025-10-14T06:00:00+02:00
    jobctl summary --tag 2025-10-14

The day comes from the occurrence the schedule fired for (`ctx.job.fire_at`), not from
the clock when the job happens to run, so a late run, a retry or a second trigger for
the same occurrence day all build the same batch key. Each child's unique key is
(batch key, model, run, prompt), and `ctx.enqueue_batch` creates a child once per key
even if an earlier one already finished: triggering the day twice creates nothing new.
"""

from __future__ import annotations

import hashlib
from zoneinfo import ZoneInfo

import msgspec
import trio

from actors import Context, job
from protocol.jobs import JobSpec


class DailyArgs(msgspec.Struct):
    prompts: list[str]
    models: list[str]
    runs: int = 1
    tz: str = "UTC"  # the day of the batch is the occurrence's date in this zone


@job("predictions.daily", timeout="10m")
async def daily(ctx: Context, args: DailyArgs) -> dict:
    fired = ctx.job.fire_at or ctx.job.run_at  # enqueued by hand: the day it runs
    day = fired.astimezone(ZoneInfo(args.tz)).date().isoformat()
    children = [
        JobSpec(
            kind="predictions.predict",
            args={"prompt": prompt, "model": model, "run": run, "day": day},
            unique_key=f"predict:{day}:{model}:{run}:{_digest(prompt)}",
            tags=[day, "predictions"],
        )
        for prompt in args.prompts
        for model in args.models
        for run in range(args.runs)
    ]
    done = await ctx.enqueue_batch(children)  # one round trip for the whole day
    return {"day": day, "children": len(done), "created": sum(d.created for d in done)}


class PredictArgs(msgspec.Struct):
    prompt: str
    model: str
    run: int
    day: str


@job("predictions.predict", key=lambda a: a.model, max_attempts=3, timeout="5m")
async def predict(ctx: Context, args: PredictArgs) -> dict:
    await trio.sleep(0.01)  # stands in for the model call
    answer = _digest(f"{args.model}|{args.prompt}|{args.run}")
    return {"model": args.model, "run": args.run, "day": args.day, "answer": answer}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
