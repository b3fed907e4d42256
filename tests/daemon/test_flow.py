"""Flow control in Postgres (jobd.claim_flow and the finish effects), on pinned time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from actors.ports import NewJob, Outcome

KINDS = ["noop"]
T0 = datetime(2030, 1, 1, tzinfo=UTC)


async def enqueue(store, key: str | None, n: int, queue: str = "crawl", **extra) -> list[int]:
    done = await store.enqueue_many(
        [NewJob(kind="noop", queue=queue, key=key, **extra) for _ in range(n)])
    return [d.id for d in done]


async def claim(store, limits, n: int = 100, at: datetime = T0, queue: str = "crawl",
                paused=None):
    return await store.claim(queue, n, "d1", 60.0, KINDS, now=at, limits=limits,
                             paused_keys=paused)


def ok(job, **extra) -> Outcome:
    return Outcome(id=job.id, token=job.lease_token, state="completed", flow="ok", **extra)


def keys(jobs) -> dict[str, int]:
    out: dict[str, int] = {}
    for job in jobs:
        out[job.key] = out.get(job.key, 0) + 1
    return out


async def test_key_concurrency_with_override(store):
    await enqueue(store, "fast", 10)
    await enqueue(store, "slow", 10)
    limits = {"default": {"concurrency": 3}, "keys": {"slow": {"concurrency": 1}}}
    first = await claim(store, limits)
    assert keys(first) == {"fast": 3, "slow": 1}
    assert await claim(store, limits) == []
    await store.finish_many([ok(j) for j in first if j.key == "fast"][:2])
    assert keys(await claim(store, limits)) == {"fast": 2}


async def test_token_bucket_bounds_starts(store):
    await enqueue(store, "m", 20)
    limits = {"default": {"rate": 2.0, "burst": 3}, "keys": {}}
    assert len(await claim(store, limits, at=T0)) == 3  # the burst
    assert len(await claim(store, limits, at=T0 + timedelta(seconds=0.4))) == 0
    assert len(await claim(store, limits, at=T0 + timedelta(seconds=1.0))) == 2
    # A long idle time refills only up to the burst.
    assert len(await claim(store, limits, at=T0 + timedelta(seconds=100))) == 3


async def test_queue_wide_rate(store):
    for key in ("a", "b", "c"):
        await enqueue(store, key, 5)
    limits = {"queue_rate": 5 / 60, "queue_burst": 1, "default": {}, "keys": {}}
    assert len(await claim(store, limits, at=T0)) == 1
    assert len(await claim(store, limits, at=T0 + timedelta(seconds=6))) == 0
    assert len(await claim(store, limits, at=T0 + timedelta(seconds=12))) == 1


async def test_keys_are_served_fairly(store):
    await enqueue(store, "deep", 1000)
    await enqueue(store, "shallow", 10)
    limits = {"default": {}, "keys": {}}
    got = keys(await claim(store, limits, n=10))
    assert got["shallow"] >= 4 and got["deep"] >= 4
    # FIFO within a key.
    await enqueue(store, "fifo", 5)
    fifo = [j.id for j in await claim(store, limits, n=300) if j.key == "fifo"]
    assert fifo == sorted(fifo)


async def test_tokens_per_minute_weights_by_cost(store):
    await enqueue(store, "gpt-4o", 10, queue="models", cost=30_000)
    limits = {"default": {"tpm": 90_000}, "keys": {}}
    assert len(await claim(store, limits, queue="models", at=T0)) == 3
    assert len(await claim(store, limits, queue="models", at=T0 + timedelta(seconds=10))) == 0
    # 20 s refill 30,000 tokens: one more job's worth.
    assert len(await claim(store, limits, queue="models", at=T0 + timedelta(seconds=20))) == 1


async def test_rate_limited_outcome_pauses_the_key_and_halves_adaptive_rate(store, sql):
    await enqueue(store, "ebay", 5)
    await enqueue(store, "amazon", 5)
    limits = {"default": {"concurrency": 5, "rate": 100.0, "adaptive": True}, "keys": {}}
    now = datetime.now(UTC)
    first = await claim(store, limits, at=now)
    ebay = next(j for j in first if j.key == "ebay")
    await store.finish_many([Outcome(id=ebay.id, token=ebay.lease_token, state="scheduled",
                                     delay_s=60, flow="rate_limited", pause_s=60)])
    row = sql.fetch("SELECT paused_until, rate_factor FROM jobd.flow_keys "
                    "WHERE queue = 'crawl' AND key = 'ebay'")[0]
    assert row["rate_factor"] == 0.5
    assert row["paused_until"] > now + timedelta(seconds=55)
    await store.finish_many([ok(j) for j in first if j.key == "amazon"])
    await enqueue(store, "ebay", 2)
    await enqueue(store, "amazon", 2)
    later = now + timedelta(seconds=5)
    assert set(keys(await claim(store, limits, at=later))) == {"amazon"}
    assert "ebay" in keys(await claim(store, limits, at=now + timedelta(seconds=61)))
    # Successes raise the factor additively again.
    assert sql.fetchval("SELECT rate_factor FROM jobd.flow_keys WHERE key = 'amazon'") == 1.0


async def test_breaker_opens_holds_and_probes(store, sql):
    await enqueue(store, "flaky", 20)
    limits = {"default": {"breaker_failures": 3, "breaker_cooldown_s": 30}, "keys": {}}
    for _ in range(3):
        [job] = await claim(store, limits, n=1)
        await store.finish_many([Outcome(id=job.id, token=job.lease_token, state="available",
                                         delay_s=0, flow="fail")])
    opened = sql.fetchval("SELECT last_failure_at FROM jobd.flow_keys WHERE key = 'flaky'")
    assert await claim(store, limits, at=opened + timedelta(seconds=10)) == []
    probe = await claim(store, limits, at=opened + timedelta(seconds=31))
    assert len(probe) == 1  # half-open: one at a time
    assert await claim(store, limits, at=opened + timedelta(seconds=32)) == []
    await store.finish_many([ok(probe[0])])
    assert len(await claim(store, limits, n=5, at=opened + timedelta(seconds=33))) == 5


async def test_paused_keys_are_skipped(store):
    await enqueue(store, "a", 3)
    await enqueue(store, "b", 3)
    got = await claim(store, {"default": {}, "keys": {}}, paused=["a"])
    assert set(keys(got)) == {"b"}


async def test_priority_aging_lets_batch_work_through(store, sql):
    batch = await enqueue(store, "m", 3, priority=10)
    now = datetime.now(UTC)
    # Batch jobs waiting 25 minutes with 10-minute aging move up two steps.
    aged = await store.age_priorities("crawl", 600, 0, 100, now=now + timedelta(minutes=25))
    assert aged == 3
    rows = sql.fetch("SELECT priority, base_priority FROM jobd.jobs WHERE id = any($1)", batch)
    assert {(r["priority"], r["base_priority"]) for r in rows} == {(8, 10)}
    # Never past the floor.
    await store.age_priorities("crawl", 600, 5, 100, now=now + timedelta(hours=10))
    assert sql.fetchval("SELECT min(priority) FROM jobd.jobs") == 5


async def test_plain_claim_is_untouched_without_limits(store):
    await enqueue(store, "x", 5)
    assert len(await claim(store, None)) == 5


async def test_adaptive_rate_recovers_additively_on_success(store, sql):
    await enqueue(store, "site", 30)
    limits = {"default": {"rate": 100.0, "burst": 100, "adaptive": True}, "keys": {}}
    now = datetime.now(UTC)
    [first, *rest] = await claim(store, limits, n=11, at=now)
    await store.finish_many([Outcome(id=first.id, token=first.lease_token, state="scheduled",
                                     delay_s=0, flow="rate_limited")])
    assert sql.fetchval("SELECT rate_factor FROM jobd.flow_keys WHERE key = 'site'") == 0.5
    await store.finish_many([ok(j) for j in rest])  # ten successes: +2 % each
    factor = sql.fetchval("SELECT rate_factor FROM jobd.flow_keys WHERE key = 'site'")
    assert abs(factor - 0.7) < 1e-9
    # The effective rate is what the bucket refills at: 70 starts per second now.
    await enqueue(store, "site", 200)
    later = now + timedelta(seconds=10)
    await claim(store, limits, n=1000, at=later)  # drain the refilled bucket (its burst)
    assert len(await claim(store, limits, n=1000, at=later + timedelta(seconds=0.1))) == 7
