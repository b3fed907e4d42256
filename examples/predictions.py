"""Interactive prediction sessions (high priority: several models in turn, credits refunded
when every model fails) beside a nightly batch (low priority) on the same queue."""

from __future__ import annotations

import msgspec

from actors import Context, Fail, job
from actors.workflow import Child
from examples._api import post

INTERACTIVE, BATCH = 0, 10  # lower runs first


class SessionArgs(msgspec.Struct):
    user: str
    question: str
    models: list[str] = msgspec.field(default_factory=lambda: ["fast-1", "smart-1", "backup-1"])
    credits: int = 1


async def refund_credits(ctx: Context, args: SessionArgs, error: dict | None) -> None:
    # A step: a crash after the refund call and before its result is stored repeats the
    # call, so the API is told an idempotency key (the failed job's id).
    await ctx.step("refund", post, "/v1/credits/refund",
                   {"user": args.user, "credits": args.credits,
                    "idempotency_key": f"session:{ctx.job.id}"})


@job("predict.session", queue="models", priority=INTERACTIVE, timeout="2m", max_attempts=1,
     on_failure=refund_credits)
async def session(ctx: Context, args: SessionArgs) -> dict:
    errors = []
    for model in args.models:
        try:
            answer = await ctx.step(f"predict:{model}", post, "/v1/complete",
                                    {"model": model, "prompt": args.question}, retries=1,
                                    backoff_s=0.05)
            return {"model": model, "answer": answer["text"], "tried": len(errors) + 1}
        except Exception as exc:  # noqa: BLE001 - next model; the errors go in the failure
            errors.append(f"{model}: {exc}")
    raise Fail("every model failed: " + "; ".join(errors))


class NightlyArgs(msgspec.Struct):
    day: str
    questions: list[str]


class ItemArgs(msgspec.Struct):
    question: str
    model: str = "smart-1"


@job("predict.item", queue="models", priority=BATCH, max_attempts=8,
     retry_delays={"rate_limit": 0.5, "network": 0.2})
async def item(ctx: Context, args: ItemArgs) -> str:
    out = await ctx.step("predict", post, "/v1/complete",
                         {"model": args.model, "prompt": args.question})
    return out["text"]


@job("predict.nightly", queue="models", priority=BATCH, timeout="1h")
async def nightly(ctx: Context, args: NightlyArgs) -> dict:
    ids = await ctx.spawn_many([Child(kind="predict.item", args={"question": q}, priority=BATCH)
                                for q in args.questions], name="items")
    results = await ctx.gather(ids, name="items")
    return {"day": args.day, "done": sum(r.ok for r in results),
            "failed": sum(not r.ok for r in results)}
