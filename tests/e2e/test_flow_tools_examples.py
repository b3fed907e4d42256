"""examples/flow_tools.py through a real daemon: the marketplace capture debounced per
marketplace, the daily digest batched from many small enqueues."""

from __future__ import annotations

import json

from protocol.client import SyncClient
from tests.support import wait_until

OPTIONS = {"modules": ["examples.flow_tools"],
           "queues": {"crawl": {"concurrency": 5}, "default": {"concurrency": 5}}}


def test_marketplace_capture_runs_once_per_marketplace_with_the_newest_cursor(jobd, sql):
    d = jobd(**OPTIONS)
    c = SyncClient(str(d.socket))
    ids = {c.enqueue("market.capture", {"marketplace": m, "cursor": n}).id
           for n in range(30) for m in ("ebay", "etsy", "amazon")}
    assert len(ids) == 3
    wait_until(lambda: all(c.get(i).state == "completed" for i in ids), "the three captures",
               daemons=(d,))
    results = sorted((c.get(i).result["marketplace"], c.get(i).result["from_cursor"]) for i in ids)
    assert results == [("amazon", 29), ("ebay", 29), ("etsy", 29)]


def test_daily_digest_is_built_from_many_small_enqueues(jobd, sql):
    d = jobd(**OPTIONS)
    c = SyncClient(str(d.socket))
    for i in range(250):
        c.enqueue("daily.digest", {"day": "2026-12-03", "email": f"u{i}@x", "plan":
                                   "pro" if i % 5 == 0 else "free"})
    wait_until(lambda: sql.fetchval("SELECT to_regclass('signup_digests') IS NOT NULL") and
               sql.fetchval("SELECT coalesce(sum(n), 0) FROM signup_digests") == 250,
               "every signup in a digest", daemons=(d,))
    rows = sql.fetch("SELECT n, by_plan::text AS by_plan FROM signup_digests ORDER BY job_id")
    assert [r["n"] for r in rows] == [100, 100, 50]
    assert sum(json.loads(r["by_plan"]).get("pro", 0) for r in rows) == 50
