"""Flow control in Postgres (jobd.claim_flow and the finish effects), on pinned time."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import msgspec

from actors.flow import FlowLimits
from actors.ports import NewJob, Outcome

KINDS = ["noop"]
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def flow(default: dict | None = None, keys: dict | None = None, **queue) -> FlowLimits:
    """Limits as jobd.claim_flow gets them (the default and the key overrides as dicts)."""
    return msgspec.convert({"default": default or {}, "keys": keys or {}, **queue}, FlowLimits)


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
    limits = flow(default={"concurrency": 3}, keys={"slow": {"concurrency": 1}})
    first = await claim(store, limits)
    assert keys(first) == {"fast": 3, "slow": 1}
    assert await claim(store, limits) == []
    await store.finish_many([ok(j) for j in first if j.key == "fast"][:2])
    assert keys(await claim(store, limits)) == {"fast": 2}


async def test_token_bucket_bounds_starts(store):
    await enqueue(store, "m", 20)
    limits = flow(default={"rate": 2.0, "burst": 3})
    assert len(await claim(store, limits, at=T0)) == 3  # the burst
    assert len(await claim(store, limits, at=T0 + timedelta(seconds=0.4))) == 0
    assert len(await claim(store, limits, at=T0 + timedelta(seconds=1.0))) == 2
    # A long idle time refills only up to the burst.
    assert len(await claim(store, limits, at=T0 + timedelta(seconds=100))) == 3


async def test_queue_wide_rate(store):
    for key in ("a", "b", "c"):
        await enqueue(store, key, 5)
    limits = flow(queue_rate=5 / 60, queue_burst=1)
    assert len(await claim(store, limits, at=T0)) == 1
    assert len(await claim(store, limits, at=T0 + timedelta(seconds=6))) == 0
    assert len(await claim(store, limits, at=T0 + timedelta(seconds=12))) == 1


async def test_keys_are_served_fairly(store):
    await enqueue(store, "deep", 1000)
    await enqueue(store, "shallow", 10)
    limits = flow()
    got = keys(await claim(store, limits, n=10))
    assert got["shallow"] >= 4 and got["deep"] >= 4
    # FIFO within a key.
    await enqueue(store, "fifo", 5)
    fifo = [j.id for j in await claim(store, limits, n=300) if j.key == "fifo"]
    assert fifo == sorted(fifo)


async def test_tokens_per_minute_weights_by_cost(store):
    await enqueue(store, "gpt-4o", 10, queue="models", cost=30_000)
    limits = flow(default={"tpm": 90_000})
    assert len(await claim(store, limits, queue="models", at=T0)) == 3
    assert len(await claim(store, limits, queue="models", at=T0 + timedelta(seconds=10))) == 0
    # 20 s refill 30,000 tokens: one more job's worth.
    assert len(await claim(store, limits, queue="models", at=T0 + timedelta(seconds=20))) == 1


async def test_rate_limited_outcome_pauses_the_key_and_halves_adaptive_rate(store, sql):
    await enqueue(store, "ebay", 5)
    await enqueue(store, "amazon", 5)
    limits = flow(default={"concurrency": 5, "rate": 100.0, "adaptive": True})
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
    limits = flow(default={"breaker_failures": 3, "breaker_cooldown_s": 30})
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
    limits = flow(default={"rate": 100.0, "burst": 100, "adaptive": True})
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


# --------------------------------------------------------------------------- issue 14, item 7
# Fairness at any number of keys, empty claims that write nothing, idle keys pruned.

ANY_KEY: dict = {"default": {}, "keys": {}}


async def test_a_new_key_is_served_after_a_hundred_thousand_one_off_keys(store, sql):
    # 0004 walked the 1,000 least recently served rows: rows of finished one-off keys
    # filled that window for ever, and a new key's second job never ran.
    sql.execute("INSERT INTO jobd.flow_keys (queue, key, served_at) "
                "SELECT 'crawl', 'user-' || g, now() - interval '1 day' "
                "FROM generate_series(1, 100000) g")
    new = await enqueue(store, "new", 10)
    deep = await enqueue(store, "deep", 30)
    order = []
    for _ in range(10):
        got = await claim(store, ANY_KEY, n=2)
        assert keys(got) == {"new": 1, "deep": 1}  # one each, claim after claim
        order += [j.id for j in got if j.key == "new"]
    assert order == new  # every job of the new key, in order
    assert keys(await claim(store, ANY_KEY, n=30)) == {"deep": 20}
    assert sorted(deep) == deep


async def test_keys_are_served_round_robin_at_twenty_thousand_keys_with_work(store, sql):
    sql.execute("INSERT INTO jobd.jobs (queue, kind, key) "
                "SELECT 'crawl', 'noop', 'user-' || lpad(g::text, 6, '0') "
                "FROM generate_series(1, 20000) g")
    await enqueue(store, "m-deep", 200)
    served: dict[str, int] = {}
    while len(served) < 20_001:
        got = await claim(store, ANY_KEY, n=2000)
        assert got
        if len(got) == 2000:  # a full claim: 2,000 keys, one job each
            assert set(keys(got).values()) == {1}
        for key, n in keys(got).items():
            served[key] = served.get(key, 0) + n
    # One round served every key, the deep one no sooner than a one-off key.
    assert all(served[f"user-{g:06}"] == 1 for g in range(1, 20_001))


async def test_an_empty_claim_writes_nothing(store, sql):
    # 500 keys whose jobs are done, one paused, one at its concurrency, one rate-bound:
    # 0004 rewrote all 500 rows on every claim (every 2 s per idle queue).
    ids = []
    for i in range(500):
        ids += await enqueue(store, f"k{i:03}", 1)
    limits = flow(default={"concurrency": 1, "rate": 0.0001, "burst": 1},
                  keys={"k001": {"rate": 1000, "burst": 10}}, rate_limit_pause_s=30)
    done = await claim(store, limits, n=1000)
    await store.finish_many([ok(j) for j in done])
    await enqueue(store, "k000", 1)  # its bucket is empty now
    await enqueue(store, "k001", 2)
    [busy] = await claim(store, limits, n=10, at=T0 + timedelta(hours=2))  # k001 at its limit
    assert busy.key == "k001"
    await enqueue(store, "k002", 1)

    def versions():
        return (sql.fetch("SELECT queue, key, xmin::text, xmax::text, ctid::text "
                          "FROM jobd.flow_keys ORDER BY queue, key"),
                sql.fetch("SELECT queue, xmin::text, xmax::text, ctid::text "
                          "FROM jobd.flow_queues ORDER BY queue")
                if sql.fetchval("SELECT to_regclass('jobd.flow_queues') IS NOT NULL") else [])

    before = versions()
    for minute in range(10):
        at = T0 + timedelta(hours=2, minutes=1 + minute)
        assert await claim(store, limits, n=100, at=at, paused=["k002"]) == []
    assert versions() == before


async def test_idle_keys_are_pruned_and_come_back_in_their_default_state(store, sql):
    limits = flow(default={"rate": 1.0, "burst": 2})
    for key in ("idle", "queued", "running", "paused", "failing", "refilling"):
        await enqueue(store, key, 1)
    got = {j.key: j for j in await claim(store, limits, n=100, at=T0)}  # one token each
    await store.finish_many([ok(got[k]) for k in ("idle", "queued", "paused", "refilling")])
    await store.finish_many([Outcome(id=got["failing"].id, token=got["failing"].lease_token,
                                     state="failed", flow="fail")])
    hour = T0 + timedelta(hours=1)
    sql.execute("UPDATE jobd.flow_keys SET last_failure_at = $1 WHERE key = 'failing'", hour)
    sql.execute("UPDATE jobd.flow_keys SET paused_until = $1 WHERE key = 'paused'", hour)
    await enqueue(store, "refilling", 1)
    [refill] = await claim(store, limits, n=100, at=hour)
    assert refill.key == "refilling"
    await store.finish_many([ok(refill)])
    await enqueue(store, "queued", 1)

    async def prune(at):
        return await store.prune_idle_keys(1000, 600, 3600, now=at)

    def rows():
        return {r["key"] for r in sql.fetch("SELECT key FROM jobd.flow_keys WHERE key <> ''")}

    assert await prune(T0 + timedelta(minutes=5)) == 0  # not idle for 10 minutes yet
    assert await prune(T0 + timedelta(minutes=20)) == 1
    assert rows() == {"queued", "running", "paused", "failing", "refilling"}
    assert await prune(hour + timedelta(minutes=5)) == 0
    # Ten minutes after the pause ended and the bucket refilled, those go ...
    assert await prune(hour + timedelta(minutes=11)) == 2
    assert rows() == {"queued", "running", "failing"}
    # ... a failure streak an hour after the last failure; never a key with work.
    assert await prune(hour + timedelta(hours=1, minutes=1)) == 1
    assert rows() == {"queued", "running"}
    assert sql.fetchval("SELECT count(*) FROM jobd.flow_keys WHERE key = ''") == 0
    # A pruned key is the default key: a full bucket (the burst of 2), no pause ...
    await enqueue(store, "idle", 3)
    later = T0 + timedelta(hours=3)
    again = await claim(store, limits, n=100, at=later)
    assert keys(again) == {"idle": 2, "queued": 1}
    assert sql.fetchval("SELECT tokens FROM jobd.flow_keys WHERE key = 'idle'") == 0
    # ... and an outcome of a key whose row is gone brings the row back with its effect.
    sql.execute("DELETE FROM jobd.flow_keys WHERE key = 'idle'")
    job = next(j for j in again if j.key == "idle")
    await store.finish_many([Outcome(id=job.id, token=job.lease_token, state="scheduled",
                                     delay_s=60, flow="rate_limited", pause_s=60)])
    row = sql.fetch("SELECT paused_until > now() + interval '50 s' AS paused, rate_factor "
                    "FROM jobd.flow_keys WHERE key = 'idle'")[0]
    assert row["paused"] and row["rate_factor"] == 0.5


async def test_a_rate_limit_that_states_no_pause_uses_the_queues_default(store, sql):
    await enqueue(store, "ebay", 3)
    limits = flow(default={"concurrency": 5}, rate_limit_pause_s=30)
    now = datetime.now(UTC)
    [first, *rest] = await claim(store, limits, at=now)
    await store.finish_many([Outcome(id=first.id, token=first.lease_token, state="scheduled",
                                     delay_s=600, flow="rate_limited")])
    pause = sql.fetchval("SELECT extract(epoch FROM paused_until - now())::float8 "
                         "FROM jobd.flow_keys WHERE key = 'ebay'")
    assert 25 < pause <= 30


async def test_due_delayed_jobs_of_a_key_are_claimed(store):
    ids = await enqueue(store, "later", 2, delay_s=60)
    assert await claim(store, ANY_KEY, at=datetime.now(UTC)) == []
    got = await claim(store, ANY_KEY, at=datetime.now(UTC) + timedelta(seconds=61))
    assert sorted(j.id for j in got) == ids


async def test_two_claimers_at_once_never_exceed_a_keys_limits(store, sql):
    import trio

    for i in range(40):
        await enqueue(store, f"k{i:02}", 8)
    limits = flow(default={"concurrency": 3, "rate": 1.0, "burst": 5})
    claimed: list = []

    async def claimer():
        for _ in range(15):
            claimed.extend(await claim(store, limits, n=7, at=T0))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(claimer)
    per_key = keys(claimed)
    assert len({j.id for j in claimed}) == len(claimed)
    assert per_key and max(per_key.values()) <= 3 and len(per_key) == 40
    # Finish them all at once; the pinned clock has not moved, so only the bucket's
    # remaining two tokens per key may start more.
    await store.finish_many([ok(j) for j in claimed])
    claimed.clear()
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(claimer)
    assert max(keys(claimed).values()) <= 2


# --------------------------------------------------------------------------- set-based claim
# One statement claims across every key (migration 0014): what it writes, what it spends,
# and two daemons at once.


def key_rows(sql) -> dict[str, tuple]:
    """Each key row's version (a rewrite changes xmin and ctid) and its bucket."""
    return {r["key"]: (r["xmin"], r["ctid"], r["tokens"], r["cost_tokens"], r["served_at"])
            for r in sql.fetch("SELECT key, xmin::text, ctid::text, tokens, cost_tokens, "
                               "served_at FROM jobd.flow_keys WHERE key <> ''")}


async def test_a_key_that_yields_nothing_is_not_written(store, sql):
    # "dear" passes the walk (its cost bucket is not empty, so it is locked) but its next
    # job does not fit what is left; "far" is past the claim's keys. Neither is rewritten.
    limits = flow(default={"tpm": 100, "rate": 100.0})
    await enqueue(store, "dear", 1, cost=80)
    assert len(await claim(store, limits, at=T0)) == 1  # 100 - 80: 20 tokens left
    await enqueue(store, "dear", 1, cost=80)
    for key in ("cheap", "far"):
        await enqueue(store, key, 3)
    sql.execute("UPDATE jobd.flow_queues SET next_key = NULL")  # walk from the first key
    before = key_rows(sql)
    got = await claim(store, limits, n=2, at=T0 + timedelta(seconds=1))
    assert keys(got) == {"cheap": 1}  # a share of one each; "dear" had none to give
    after = key_rows(sql)
    assert after["dear"] == before["dear"] and after["far"] == before["far"]
    assert after["cheap"][:2] != before["cheap"][:2]
    assert after["cheap"][2:4] == (99.0, 99.0)  # one request token, one cost token


async def test_many_keys_are_claimed_in_one_call_each_spending_once(store, sql):
    sql.execute("INSERT INTO jobd.jobs (queue, kind, key) "
                "SELECT 'crawl', 'noop', 'k' || lpad((g % 300)::text, 3, '0') "
                "FROM generate_series(1, 900) g")
    limits = flow(default={"concurrency": 2, "rate": 1.0, "burst": 10})
    got = await claim(store, limits, n=1000)
    assert len(got) == 600 and set(keys(got).values()) == {2}  # every key, up to its limit
    rows = sql.fetch("SELECT xmin::text AS x, tokens FROM jobd.flow_keys WHERE key <> ''")
    assert len(rows) == 300
    assert {r["tokens"] for r in rows} == {8.0}
    assert len({r["x"] for r in rows}) == 1  # one transaction wrote them all
    # Nothing more may start: each key is at its concurrency.
    assert await claim(store, limits, n=1000) == []


async def test_two_daemons_claiming_at_once_never_exceed_key_concurrency(store, sql,
                                                                          fresh_database):
    import trio

    from daemon.store import PgStore

    for i in range(30):
        await enqueue(store, f"k{i:02}", 10)
    limits = flow(default={"concurrency": 2})
    other = PgStore(fresh_database, pool_min=1, pool_max=4, timeout_s=10)
    await other.connect()
    async def claimer(s, owner: str, claimed: list) -> None:
        for _ in range(10):
            claimed.extend(await s.claim("crawl", 9, owner, 60.0, KINDS, limits=limits))

    try:
        for _ in range(3):  # three rounds: claim at once, check, finish everything
            claimed: list = []
            async with trio.open_nursery() as nursery:
                for s, owner in ((store, "d1"), (other, "d2"), (store, "d1"), (other, "d2")):
                    nursery.start_soon(claimer, s, owner, claimed)
            assert len({j.id for j in claimed}) == len(claimed)
            assert set(keys(claimed).values()) == {2}  # every key full, none over
            running = sql.fetch("SELECT key, count(*) AS n FROM jobd.jobs "
                                "WHERE state = 'running' GROUP BY key")
            assert len(running) == 30 and max(r["n"] for r in running) == 2
            await store.finish_many([ok(j) for j in claimed])
    finally:
        await other.close()


async def test_the_rate_holds_with_two_claimers_over_time(store):
    import trio

    for i in range(10):
        await enqueue(store, f"k{i}", 50)
    limits = flow(default={"rate": 2.0, "burst": 3})
    claimed: list = []

    async def claimer(at) -> None:
        claimed.extend(await claim(store, limits, n=50, at=at))

    for step in range(10):  # every 0.5 s one more token per key
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(claimer, T0 + timedelta(seconds=step / 2))
    # In 4.5 s a key starts at most burst + rate x 4.5 = 12 jobs, and it was never idle.
    assert set(keys(claimed).values()) == {12}


async def test_a_binding_key_concurrency_takes_exactly_its_limit(store):
    await enqueue(store, "k", 10)
    limits = flow(default={"concurrency": 2})
    assert keys(await claim(store, limits)) == {"k": 2}
    assert await claim(store, limits) == []


async def test_a_binding_rate_takes_its_burst_then_nothing_until_refill(store):
    await enqueue(store, "k", 20)
    limits = flow(default={"rate": 5.0, "burst": 5})
    assert len(await claim(store, limits, at=T0)) == 5
    assert await claim(store, limits, at=T0 + timedelta(seconds=0.1)) == []
    assert len(await claim(store, limits, at=T0 + timedelta(seconds=0.4))) == 2


async def test_the_claim_reads_by_key_on_statistics_taken_before_a_burst(store, sql):
    # Statistics from a queue that held only finished jobs, then a burst before
    # autoanalyze: the planner took the burst for one row and served every descent of
    # the key walk from jobs_claimable, reading the whole queue each time (150-290 ms a
    # claim, until autoanalyze; migration 0021). The index scans of one claim say which
    # path it took, whatever the timing.
    sql.execute("ALTER TABLE jobd.jobs SET (autovacuum_enabled = false)")
    sql.execute("INSERT INTO jobd.jobs (queue, kind, key, state, finished_at) "
                "SELECT 'crawl', 'noop', NULL, 'completed', now() FROM generate_series(1, 2000)")
    sql.execute("ANALYZE jobd.jobs")
    sql.execute("TRUNCATE jobd.jobs, jobd.job_steps")
    # 20,000 jobs over 50 keys: the bench's burst, which the planner misjudged.
    sql.execute("INSERT INTO jobd.jobs (queue, kind, key) "
                "SELECT 'crawl', 'noop', 'k' || lpad((g % 50)::text, 2, '0') "
                "FROM generate_series(1, 20000) g")
    sql.execute("DELETE FROM jobd.flow_keys WHERE key = ''")  # no keyless turn to take
    limits = msgspec.json.encode(flow(default={"concurrency": 1000, "rate": 1e6})).decode()
    [row] = sql.fetch(
        "WITH c AS MATERIALIZED (SELECT key FROM jobd.claim_flow("
        "    'crawl', 100, 'd1', 60, ARRAY['noop'], ARRAY[]::text[], $1, $2::jsonb)) "
        "SELECT array_agg(c.key) AS keys, "
        "       pg_stat_get_xact_numscans('jobd.jobs_claimable'::regclass) AS claimable, "
        "       pg_stat_get_xact_numscans('jobd.jobs_available_by_key'::regclass) AS by_key "
        "FROM c", T0, limits)
    assert Counter(row["keys"]) == {f"k{g:02}": 2 for g in range(50)}
    assert row["claimable"] == 0
    assert row["by_key"] >= 100  # a descent per key, then a read per key


async def test_one_count_of_the_queue_stands_for_the_keys_only_where_it_cannot_bind(store):
    # While the queue's running jobs leave room for a whole claim under a key's
    # concurrency, one count of them replaces the key's own (0021); where they do not,
    # the key is counted itself. Either way a key takes what its own running jobs allow.
    await enqueue(store, "a", 10)
    await enqueue(store, "wide", 40)
    limits = flow(default={"concurrency": 5}, keys={"wide": {"concurrency": 1000}})
    taken = {"a": 0, "wide": 0}
    for _ in range(6):
        for key, n in keys(await claim(store, limits, n=4)).items():
            taken[key] += n
        assert taken["a"] <= 5
    assert taken == {"a": 5, "wide": 18}  # the claim that met a's limit came back one short
    # Past the count's budget (ten times the claim) every key is counted itself.
    await enqueue(store, "b", 3)
    assert keys(await claim(store, limits, n=2)) == {"b": 1, "wide": 1}
    assert keys(await claim(store, limits, n=2)) == {"b": 1, "wide": 1}


async def test_a_look_for_keyless_jobs_that_found_none_is_not_repeated_for_a_second(store, sql):
    # A queue that has had jobs without a key looked for them on every claim, reading
    # past the whole keyed backlog (0021): now a look that finds none is noted, an
    # insert of a keyless job clears the note, and anything else waits out its second.
    await enqueue(store, "k", 20)
    [first] = await enqueue(store, None, 1)
    [later] = await enqueue(store, None, 1)
    sql.execute("UPDATE jobd.jobs SET state = 'scheduled', run_at = $1 WHERE id = $2",
                T0 + timedelta(hours=1), later)
    got = await claim(store, ANY_KEY, n=4, at=T0)
    assert first in [j.id for j in got] and keys(got)["k"] == 2
    assert keys(await claim(store, ANY_KEY, n=2, at=T0)) == {"k": 1}  # looked, found none
    assert sql.fetchval("SELECT keyless_none_at FROM jobd.flow_queues "
                        "WHERE queue = 'crawl'") == T0
    # Due by an update, as a retry or a rescue makes it: taken once the second is up.
    sql.execute("UPDATE jobd.jobs SET run_at = $1 WHERE id = $2", T0, later)
    half = T0 + timedelta(seconds=0.5)
    assert keys(await claim(store, ANY_KEY, n=2, at=half)) == {"k": 2}
    got = await claim(store, ANY_KEY, n=2, at=T0 + timedelta(seconds=1.5))
    assert later in [j.id for j in got]
    # An insert clears the note at once.
    await claim(store, ANY_KEY, n=2, at=T0 + timedelta(seconds=2))  # found none again
    [fresh] = await enqueue(store, None, 1)
    got = await claim(store, ANY_KEY, n=2, at=T0 + timedelta(seconds=2.1))
    assert fresh in [j.id for j in got]


async def test_two_daemons_at_once_hold_a_key_concurrency_the_queue_count_stands_for(
        store, sql, fresh_database):
    # Small claims under a roomy limit: most claims count the queue once instead of the
    # key (0021), two daemons claim at once, and the key still never passes its limit.
    import trio

    from daemon.store import PgStore

    await enqueue(store, "k", 100)
    await enqueue(store, "wide", 100)
    limits = flow(default={"concurrency": 12}, keys={"wide": {"concurrency": 1000}})
    other = PgStore(fresh_database, pool_min=1, pool_max=4, timeout_s=10)
    await other.connect()
    claimed: list = []

    async def claimer(s, owner: str) -> None:
        for _ in range(12):
            claimed.extend(await s.claim("crawl", 2, owner, 60.0, KINDS, limits=limits))

    def running() -> dict[str, int]:
        return {r["key"]: r["n"] for r in sql.fetch(
            "SELECT key, count(*) AS n FROM jobd.jobs WHERE state = 'running' GROUP BY key")}

    try:
        for _ in range(2):  # at once; then, after a top-up, at once against a full key
            async with trio.open_nursery() as nursery:
                for s, owner in ((store, "d1"), (other, "d2"), (store, "d1"), (other, "d2")):
                    nursery.start_soon(claimer, s, owner)
            assert len({j.id for j in claimed}) == len(claimed)
            assert running()["k"] == keys(claimed)["k"] <= 12
            for _ in range(12):  # one claimer fills what the skipped (locked) turns left
                claimed.extend(await claim(store, limits, n=2, at=None))
            assert running()["k"] == keys(claimed)["k"] == 12
    finally:
        await other.close()
    assert running()["wide"] == keys(claimed)["wide"] > 12


async def test_a_claim_counts_the_queue_again_once_its_locks_are_held(store, sql,
                                                                      fresh_database):
    # Daemon B's claim (11 of the key's 12) is in flight, holding the key's new row;
    # daemon A's claim counts the queue's running jobs (none it can see), then waits on
    # that row. The count that decides A's share is taken after B commits: a count from
    # before the wait would let A start 2 more, 13 in all (0021).
    import asyncio
    import threading

    import asyncpg
    import trio

    await enqueue(store, "k", 20)
    sql.execute("DELETE FROM jobd.flow_keys WHERE key = 'k'")  # pruned while idle
    limits = msgspec.json.encode(flow(default={"concurrency": 12})).decode()
    in_flight, release = threading.Event(), threading.Event()
    taken_by_b: list[int] = []

    async def daemon_b() -> None:
        conn = await asyncpg.connect(fresh_database)
        try:
            async with conn.transaction():
                taken_by_b.append(await conn.fetchval(
                    "SELECT count(*) FROM jobd.claim_flow('crawl', 11, 'd2', 60, "
                    "ARRAY['noop'], ARRAY[]::text[], NULL, $1::jsonb)", limits))
                in_flight.set()
                await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        finally:
            in_flight.set()  # a failed claim must not leave the test waiting
            await conn.close()

    b = threading.Thread(target=lambda: asyncio.run(daemon_b()))
    b.start()
    try:
        await trio.to_thread.run_sync(in_flight.wait, 30)
        assert taken_by_b == [11]
        got: list = []

        async def daemon_a() -> None:
            got.extend(await store.claim("crawl", 2, "d1", 60.0, KINDS,
                                         limits=flow(default={"concurrency": 12})))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon_a)
            await trio.sleep(0.5)
            assert not got  # waiting on B's row
            release.set()
    finally:
        release.set()
        await trio.to_thread.run_sync(b.join)
    assert len(got) == 1
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE key = 'k' "
                        "AND state = 'running'") == 12
