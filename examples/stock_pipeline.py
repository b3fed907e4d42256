"""research -> human approval -> ranking -> 5 parallel analyses -> judge (rejects up to
3 times; each retry drafts with a new variation) -> format.

Approve a waiting pipeline with
`jobctl send-event subsector.approved --data '{"id": <job id>}'`.
"""

from __future__ import annotations

import msgspec

from actors import Context, Fail, job
from actors.workflow import Child
from examples._api import post

MAX_REJECTIONS = 3


class PipelineArgs(msgspec.Struct):
    sector: str
    tickers: list[str]
    approval_timeout: str = "7d"


class AnalyseArgs(msgspec.Struct):
    ticker: str
    research: str
    variant: int = 0


async def llm(prompt: str, model: str = "research-1", variation: int = 0) -> dict:
    return await post("/v1/complete", {"model": model, "prompt": prompt, "variation": variation})


@job("stocks.pipeline", queue="models", timeout="10m", max_attempts=5)
async def pipeline(ctx: Context, args: PipelineArgs) -> dict:
    research = await ctx.step("research", llm, f"research the {args.sector} sector")
    ctx.progress(10, "researched; waiting for approval")
    approval = await ctx.wait_for_event("subsector.approved", match={"id": ctx.job.id},
                                        timeout=args.approval_timeout)
    if approval is None:
        raise Fail("not approved in time")
    ranked = await ctx.step("rank", _rank, args.tickers, research["text"])
    ctx.progress(30, "ranked")
    ids = await ctx.spawn_many(
        [Child(kind="stocks.analyse", args=AnalyseArgs(ticker=t, research=research["text"]))
         for t in ranked[:5]], name="analyses")
    analyses = await ctx.gather(ids, name="analyses")
    good = [a.result for a in analyses if a.ok]
    if len(good) < 3:
        raise Fail(f"only {len(good)} of {len(analyses)} analyses succeeded")
    ctx.progress(70, "analysed; judging")
    verdicts = []
    for round_ in range(MAX_REJECTIONS + 1):
        draft = await ctx.step(f"draft:{round_}", llm, f"summarise {good}", "writer-1", round_)
        verdict = await ctx.step(f"judge:{round_}", post, "/v1/judge",
                                 {"subject": f"{ctx.job.id}:{args.sector}", "draft": draft["text"]})
        verdicts.append(verdict["feedback"])
        if verdict["approved"]:
            break
    else:
        raise Fail(f"the judge rejected {MAX_REJECTIONS + 1} drafts")
    report = await ctx.step("format", _format, args.sector, draft["text"], good)
    return {"report": report, "rounds": len(verdicts), "approved_by": approval.get("by")}


async def _rank(tickers: list[str], research: str) -> list[str]:
    scored = [(await llm(f"score {t} given {research}", "ranker-1"))["score"] for t in tickers]
    return [t for _, t in sorted(zip(scored, tickers, strict=True), reverse=True)]


@job("stocks.analyse", queue="models", timeout="5m", max_attempts=5,
     retry_delays={"rate_limit": 0.5, "network": 0.2})
async def analyse(ctx: Context, args: AnalyseArgs) -> dict:
    out = await ctx.step(f"analyse:{args.ticker}:{args.variant}", llm,
                         f"analyse {args.ticker}", "analyst-1", args.variant)
    return {"ticker": args.ticker, "view": out["text"], "score": out["score"]}


def _format(sector: str, summary: str, analyses: list[dict]) -> str:
    lines = [f"# {sector}", summary, ""]
    lines += [f"- {a['ticker']}: {a['score']} ({a['view']})" for a in analyses]
    return "\n".join(lines)
