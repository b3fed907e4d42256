"""examples/flow_tools.py through a real daemon: the marketplace capture debounced per
marketplace, the daily digest batched from many small enqueues, and both again started
by events."""

from __future__ import annotations

import json

from protocol.client import SyncClient
from protocol.events import EventSpec
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


def test_the_same_flows_started_by_events(jobd, sql):
    """One event per change or signup: the subscribed kinds collapse them as their
    enqueues are collapsed (the events' jobs go through the same insertion)."""
    d = jobd(**OPTIONS)
    c = SyncClient(str(d.socket))
    sent = c.send_events([EventSpec(name="marketplace/changed",
                                    data={"marketplace": m, "cursor": n})
                          for n in range(20) for m in ("ebay", "etsy")])
    assert len(sent.events) == 40
    for i in range(120):
        c.send_event("user/signed_up", {"day": "2026-12-04", "email": f"e{i}@x"})

    def captures():
        rows = sql.fetch("SELECT state, result::text AS result FROM jobd.jobs "
                         "WHERE kind = 'market.capture'")
        return rows if rows and all(r["state"] == "completed" for r in rows) else None

    rows = wait_until(captures, "the debounced captures", daemons=(d,))
    assert sorted((json.loads(r["result"])["marketplace"], json.loads(r["result"])["from_cursor"])
                  for r in rows) == [("ebay", 19), ("etsy", 19)]
    wait_until(lambda: sql.fetchval("SELECT to_regclass('signup_digests') IS NOT NULL") and
               sql.fetchval("SELECT coalesce(sum(n), 0) FROM signup_digests "
                            "WHERE day = '2026-12-04'") == 120,
               "every signup event in a digest", daemons=(d,))
    assert [r["n"] for r in sql.fetch("SELECT n FROM signup_digests WHERE day = '2026-12-04' "
                                       "ORDER BY job_id")] == [100, 20]
