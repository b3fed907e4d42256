"""Per marketplace: refresh (page through listings) -> enrich each listing -> analyse,
with progress written every N items or T seconds (config `jobs.progress_every_*`)."""

from __future__ import annotations

import msgspec

from actors import Context, job
from examples._api import get, post


class RefreshArgs(msgspec.Struct):
    marketplace: str


@job("market.refresh", queue="crawl", key=lambda a: a.marketplace, timeout="30m",
     max_attempts=10, retry_delays={"rate_limit": 0.5, "network": 0.2})
async def refresh(ctx: Context, args: RefreshArgs) -> dict:
    listings: list[dict] = []
    page: int | None = 0
    while page is not None:
        out = await ctx.step(f"page:{page}", get,
                             f"/v1/listings?marketplace={args.marketplace}&page={page}")
        listings += out["items"]
        page = out["next_page"]
    ctx.progress(20, f"{len(listings)} listings")
    enriched = []
    for n, listing in enumerate(listings, 1):
        extra = await ctx.step(f"enrich:{listing['id']}", post, "/v1/enrich", {"id": listing["id"]})
        enriched.append({**listing, **extra})
        ctx.progress(20 + 70 * n / len(listings), f"enriched {n}/{len(listings)}")
    summary = await ctx.step("analyse", _analyse, enriched)
    return {"marketplace": args.marketplace, "listings": len(enriched), **summary}


def _analyse(items: list[dict]) -> dict:
    by_category: dict[str, list[int]] = {}
    for i in items:
        by_category.setdefault(i["category"], []).append(i["price"])
    return {"median_price": {c: sorted(p)[len(p) // 2] for c, p in sorted(by_category.items())}}
