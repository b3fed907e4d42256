"""The dashboard's page timings with 1,000,000 jobs in jobd.jobs (the issue: the runs page
answers in under 200 ms at that size).

    python -m bench.dashboard_pages [--jobs 1000000] [--reps 50] [--database-url URL]
                                    [--pg-dir DIR] [--only NAME,...]

1. A throwaway embedded cluster (or a new database on the server `--database-url` names;
   or a kept cluster in `--pg-dir`, seeded once and reused), migrated by starting the
   real `jobd` once, then seeded with one INSERT ... SELECT generate_series: five queues,
   twelve kinds, 100 flow keys, mostly completed, ~3 % failed with errors shaped as the
   worker writes them, a backlog of available/scheduled/running/waiting jobs in the last
   hour, tags, unique keys, 2,000 workflows with steps and 5 children each. VACUUM ANALYZE.
2. Starts `jobd` with HTTP and a token (every queue paused, retention above the table's
   size, so nothing changes the data), and times each target warm, `--reps` times: the
   /ui/ pages once they exist (signed in through POST /ui/login), and the same data
   through the JSON API (/v1/list, /v1/summary, /v1/stats, /v1/jobs/N), so a page's
   rendering and its queries are apart.
3. Times every statement behind those answers in Postgres itself (EXPLAIN ANALYZE, the
   custom plan asyncpg gets first and the generic plan a prepared statement may switch
   to after five runs), so a slow page names its slow statement.

Raw results (and the plans) go to bench/results/dashboard-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import PgConn, _stat_fields, pct, pg_cluster_cpu, scratch_db  # noqa: E402
from bench.control_bench import free_port  # noqa: E402
from bench.jobd_bench import stop  # noqa: E402
from daemon.embedded import EmbeddedPostgres  # noqa: E402
from daemon.store.sql import control as control_sql  # noqa: E402
from daemon.store.sql import flow as flow_sql  # noqa: E402
from daemon.store.sql import jobs as jobs_sql  # noqa: E402
from daemon.store.sql import metrics as metrics_sql  # noqa: E402
from daemon.store.sql import workflows as workflows_sql  # noqa: E402
from protocol.commands import FILTER_FIELDS  # noqa: E402
from tests.support import JobdProcess  # noqa: E402

QUEUES = ("default", "crawl", "llm", "email", "effects")
# kind -> queue; index = g % 10 for ordinary jobs (pipeline and its steps are placed apart).
KINDS = ("crawl.fetch", "crawl.parse", "llm.summarize", "llm.classify", "llm.embed",
         "email.send", "report.build", "effects.webhook", "image.resize", "billing.sync")
KIND_QUEUES = ("crawl", "crawl", "llm", "llm", "llm", "email", "default", "effects",
               "default", "default")
WORKFLOW_EVERY = 500  # one workflow ("pipeline") per 500 ids, its 5 children right after it
RARE_ERROR = "certificate verify failed: unable to get local issuer certificate"
RARE_KIND = "legacy.import"  # only among the oldest jobs: a kind filter nothing recent matches
HAS_ERROR_FILTER = "error" in FILTER_FIELDS  # the runs page's error filter, once it lands
RECENT_SHARE = 0.1  # the newest 10 % of ids were created in the last hour

# The worker's traceback (actors.retry.summarize): the innermost frames, formatted.
TRACEBACK = (
    '  File "/srv/app/handlers/crawl.py", line 88, in fetch\n'
    '    response = await client.get(url, timeout=30)\n'
    '  File "/srv/app/.venv/lib/python3.12/site-packages/httpx/_client.py", line 1814, in get\n'
    '    return await self.request("GET", url, params=params, headers=headers)\n'
    '  File "/srv/app/.venv/lib/python3.12/site-packages/httpx/_client.py", line 1585, in request\n'
    '    return await self.send(request, auth=auth, follow_redirects=follow_redirects)\n'
    '  File "/srv/app/handlers/crawl.py", line 91, in fetch\n'
    '    response.raise_for_status()\n')

# One row per id g. r1 picks the state, r2 the tags, duration and retries. Everything
# the unfinished states need (leases, run_at in the future, waiting_on) is set so the
# daemon would accept the row as its own; no daemon claims them (queues are paused).
SEED = f"""
INSERT INTO jobd.jobs (id, queue, kind, args, key, priority, state, attempt, max_attempts,
                       run_at, lease_token, lease_owner, lease_until, unique_key, tags,
                       parent_id, progress, result, errors, created_at, started_at,
                       finished_at, has_steps, waiting_on)
OVERRIDING SYSTEM VALUE
SELECT g, queue, kind, args, key, 0, state,
       CASE WHEN state = 'failed' THEN 3 WHEN state IN ('available', 'scheduled') THEN 0
            WHEN retried THEN 2 ELSE 1 END,
       3,
       CASE WHEN state = 'scheduled' THEN now() + r2 * interval '1 hour' ELSE created END,
       CASE WHEN state IN ('available', 'scheduled') THEN 0 ELSE 1 END,
       CASE WHEN state = 'running' THEN 'bench-ghost-daemon' END,
       CASE WHEN state = 'running' THEN now() + interval '1 day' END,
       CASE WHEN g % 10 = 3 THEN 'uk-' || g END,
       CASE WHEN r2 < 0.1 THEN ARRAY['nightly', 'batch-' || (g / 10000)]
            WHEN r2 < 0.2 THEN ARRAY['batch-' || (g / 10000)] ELSE '{{}}' END,
       parent,
       CASE WHEN state = 'completed' THEN 100 WHEN state = 'running' THEN 40 END,
       CASE WHEN state = 'completed' THEN jsonb_build_object('status', 200,
                                                              'bytes', (r2 * 100000)::int) END,
       CASE WHEN state = 'failed' THEN jsonb_build_array(err(1), err(2), err(3))
            WHEN retried AND state NOT IN ('available', 'scheduled') THEN jsonb_build_array(err(1))
            ELSE '[]' END,
       created,
       CASE WHEN state NOT IN ('available', 'scheduled', 'skipped') THEN created + r2 * interval '5 s' END,
       CASE WHEN state IN ('completed', 'failed', 'cancelled', 'skipped')
            THEN created + r2 * interval '5 s' + r1 * interval '30 s' END,
       kind = 'pipeline',
       CASE WHEN state = 'waiting' THEN jsonb_build_object('type', 'children', 'ids',
                                                           jsonb_build_array(g + 1)) END
FROM (
    SELECT g, r1, r2, queue, kind, parent, created, retried,
           jsonb_build_object('url', 'https://site-' || (g % 80) || '.example/p/' || g,
                              'depth', g % 3) AS args,
           CASE WHEN queue = 'crawl' THEN 'site-' || (g / 10 % 80)
                WHEN queue = 'llm' THEN 'tenant-' || (g / 10 % 20) END AS key,
           CASE WHEN r1 < 0.03 THEN 'failed' WHEN r1 < 0.035 THEN 'cancelled'
                WHEN r1 < 0.037 THEN 'skipped'
                WHEN NOT recent THEN 'completed'
                WHEN r1 < 0.10 THEN 'available' WHEN r1 < 0.13 THEN 'scheduled'
                WHEN r1 < 0.135 THEN 'running' WHEN r1 < 0.14 THEN 'waiting'
                ELSE 'completed' END AS state
    FROM (
        SELECT g, r1, r2, recent, r2 > 0.9 AND r2 < 0.95 AS retried,
               CASE WHEN g % {WORKFLOW_EVERY} = 0 THEN 'pipeline'
                    WHEN g % {WORKFLOW_EVERY} BETWEEN 1 AND 5 THEN 'pipeline.step'
                    WHEN g <= $1::bigint / 1000 AND g % 10 = 9 THEN '{RARE_KIND}'
                    ELSE (ARRAY{list(KINDS)})[1 + g % 10] END AS kind,
               CASE WHEN g % {WORKFLOW_EVERY} BETWEEN 0 AND 5 THEN 'default'
                    ELSE (ARRAY{list(KIND_QUEUES)})[1 + g % 10] END AS queue,
               CASE WHEN g % {WORKFLOW_EVERY} BETWEEN 1 AND 5 AND g > 5
                    THEN g - g % {WORKFLOW_EVERY} END AS parent,
               CASE WHEN recent
                    THEN now() - interval '1 hour' + ((g - $1::bigint * (1 - {RECENT_SHARE}))
                         / ($1::bigint * {RECENT_SHARE}))::float8 * interval '3590 s'
                    ELSE now() - interval '7 days' + (g / ($1::bigint * (1 - {RECENT_SHARE})))::float8
                         * (interval '7 days' - interval '1 hour') END AS created
        FROM (SELECT g, random() AS r1, random() AS r2, g > $1::bigint * (1 - {RECENT_SHARE}) AS recent
              FROM generate_series($2::bigint, $3::bigint) g) s0
    ) s1
) s2
"""

SEED_STEPS = """
INSERT INTO jobd.job_steps (job_id, name, result, attempts, started_at, finished_at)
SELECT j.id, s.name, jsonb_build_object('ok', true, 'items', s.i * 10), 1,
       j.started_at + s.i * interval '1 s', j.started_at + (s.i + 1) * interval '1 s'
FROM jobd.jobs j,
     unnest(ARRAY['fetch', 'summarize', 'classify', 'store']) WITH ORDINALITY AS s(name, i)
WHERE j.kind = 'pipeline' AND j.started_at IS NOT NULL
"""


def seed_sql() -> str:
    """SEED with err(n) spelled out: attempt n's error object as the worker writes it
    (actors/services/worker.py `_error`); the rare message names RARE_ERROR."""
    def err(n: str) -> str:
        return f"""jsonb_build_object(
            'attempt', {n}, 'at', to_char((created + {n} * interval '2 s') AT TIME ZONE 'UTC',
                                          'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
            'class', (ARRAY['unknown', 'timeout', 'rate_limit', 'unknown'])[1 + g % 4],
            'duration_s', round((r1 * 30)::numeric, 6),
            'type', (ARRAY['HTTPStatusError', 'ReadTimeout', 'RateLimited', 'ValueError'])[1 + g % 4],
            'message', CASE WHEN g % 2500 = 7 THEN 'ConnectError: [SSL: CERTIFICATE_VERIFY_FAILED] ' ||
                                                   '{RARE_ERROR} (_ssl.c:1000)'
                            ELSE (ARRAY['Server error ''503 Service Unavailable'' for url ''',
                                        'timed out reading ''', 'rate limited (429) by ''',
                                        'could not parse the page at '''])[1 + g % 4]
                                 || (args ->> 'url') || '''' END,
            'traceback', $4::text)"""
    sql = SEED
    for n in ("1", "2", "3"):
        sql = sql.replace(f"err({n})", err(n))
    return sql


def seed(db: PgConn, n: int, chunk: int = 100_000) -> dict[str, float]:
    t0 = time.perf_counter()
    db.execute("TRUNCATE jobd.jobs, jobd.job_steps")
    statement = seed_sql()
    for lo in range(1, n + 1, chunk):
        db.execute(statement, n, lo, min(n, lo + chunk - 1), TRACEBACK)
        print(f"  seeded {min(n, lo + chunk - 1):,} jobs ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    db.execute("SELECT setval('jobd.jobs_id_seq', $1)", n)
    db.execute(SEED_STEPS)
    t1 = time.perf_counter()
    db.execute("VACUUM ANALYZE jobd.jobs")
    db.execute("VACUUM ANALYZE jobd.job_steps")
    return {"insert_s": t1 - t0, "vacuum_analyze_s": time.perf_counter() - t1}


# -- the database -------------------------------------------------------------------------

@contextmanager
def database(args: argparse.Namespace) -> Iterator[str]:
    """URL of the bench database: a new one on --database-url's server, the one kept in
    --pg-dir, or one on a throwaway embedded cluster."""
    if args.database_url:
        with scratch_db(args.database_url, "jobd_dashboard") as url:
            yield url
        return
    with tempfile.TemporaryDirectory(prefix="jobd-dashboard-bench-") as tmp:
        root = Path(args.pg_dir) if args.pg_dir else Path(tmp) / "pg"
        cluster = EmbeddedPostgres(root)
        cluster.start()
        try:
            admin = PgConn(cluster.url("postgres"))
            exists = admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = 'jobd'")
            admin.close()
            yield cluster.url("jobd") if exists else cluster.create_database("jobd")
        finally:
            cluster.stop()


# -- the daemon ----------------------------------------------------------------------------

def daemon(workdir: Path, url: str, token_file: Path, port: int) -> JobdProcess:
    keep = {f"{s}_max_{what}": v for s in ("completed", "failed", "cancelled")
            for what, v in (("age", "30d"), ("count", 100_000_000))}
    queues: dict[str, dict[str, Any]] = {q: {"concurrency": 10} for q in QUEUES}
    queues["crawl"]["key_concurrency"] = 2  # flow-limited: the overview's #keys table
    queues["llm"]["key_concurrency"] = 4
    retention = "[jobs.retention]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keep.items())
    dashboard_toml = ""
    if dashboard_available():
        dashboard_toml = "[dashboard]\nenabled = true\n"
    return JobdProcess(workdir, url, modules=["examples.basic"], queues=queues,
                       jobs={"reaper_interval": "1h"},
                       control={"http": f"127.0.0.1:{port}", "token_file": str(token_file)},
                       extra_toml=retention + dashboard_toml)


def dashboard_available() -> bool:
    return (ROOT / "daemon" / "dashboard" / "pages.py").exists()


def pause_all(db: PgConn) -> None:
    db.execute("INSERT INTO jobd.pauses (queue, key) SELECT unnest($1::text[]), '' "
               "ON CONFLICT DO NOTHING", list(QUEUES))


# -- targets ------------------------------------------------------------------------------

class Fixture:
    """Ids and names the targets point at, read from the seeded table."""

    def __init__(self, db: PgConn):
        self.oldest = db.fetchval("SELECT min(id) FROM jobd.jobs")
        self.workflow = db.fetchval(
            "SELECT max(id) FROM jobd.jobs WHERE kind = 'pipeline' AND has_steps "
            "AND state = 'completed'")
        self.batch_tag = db.fetchval(
            "SELECT tags[2] FROM jobd.jobs WHERE tags[1] = 'nightly' ORDER BY id DESC LIMIT 1")
        # A time filter with no index behind it: created before 6 days ago (the oldest 1/7).
        self.old = db.fetchval("SELECT now() - interval '6 days'")


def list_body(**filters: Any) -> dict[str, Any]:
    return {k: v for k, v in filters.items() if v is not None}


def api_targets(fx: Fixture) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(name, path, JSON body or None for GET)."""
    deep = fx.oldest + 100
    return [
        ("api list (first page)", "/v1/list", list_body()),
        ("api list state=failed", "/v1/list", list_body(state=["failed"])),
        ("api list kind=crawl.fetch", "/v1/list", list_body(kind="crawl.fetch")),
        (f"api list kind={RARE_KIND} (old only)", "/v1/list", list_body(kind=RARE_KIND)),
        ("api list queue=crawl key=site-7", "/v1/list", list_body(queue="crawl", key="site-7")),
        ("api list tag=nightly", "/v1/list", list_body(tag="nightly")),
        (f"api list tag={fx.batch_tag}", "/v1/list", list_body(tag=fx.batch_tag)),
        ("api list state=available", "/v1/list", list_body(state=["available"])),
        ("api list created_before=6 days ago", "/v1/list",
         list_body(created_before=fx.old.isoformat())),
        ("api list deep page (cursor near oldest)", "/v1/list", list_body(cursor=deep)),
        ("api list state=failed deep page", "/v1/list",
         list_body(state=["failed"], cursor=fx.oldest + 100_000)),
        ("api get workflow (steps, children)", f"/v1/jobs/{fx.workflow}", None),
        *([("api list error=<rare text>", "/v1/list", list_body(error="certificate verify"))]
          if HAS_ERROR_FILTER else []),
        ("api summary (all jobs)", "/v1/summary", list_body()),
        (f"api summary tag={fx.batch_tag}", "/v1/summary", list_body(tag=fx.batch_tag)),
        ("api stats", "/v1/stats", {}),
        ("api stats finished=false (the overview's)", "/v1/stats", {"finished": False}),
        ("api activity (the overview's last hour)", "/v1/activity", {}),
        ("api inspect workflow (the run page's)", "/v1/inspect", {"job_id": fx.workflow}),
    ]


def ui_targets(fx: Fixture) -> list[tuple[str, str]]:
    deep = fx.oldest + 100
    q = urlencode
    return [
        ("ui /ui/ overview", "/ui/"),
        ("ui /ui/runs (first page)", "/ui/runs"),
        ("ui /ui/runs?state=failed", "/ui/runs?" + q({"state": "failed"})),
        ("ui /ui/runs?kind=crawl.fetch", "/ui/runs?" + q({"kind": "crawl.fetch"})),
        (f"ui /ui/runs?kind={RARE_KIND}", "/ui/runs?" + q({"kind": RARE_KIND})),
        ("ui /ui/runs?queue=crawl&key=site-7", "/ui/runs?" + q({"queue": "crawl", "key": "site-7"})),
        ("ui /ui/runs?tag=nightly", "/ui/runs?" + q({"tag": "nightly"})),
        *([("ui /ui/runs?error=<rare text>", "/ui/runs?" + q({"error": "certificate verify"}))]
          if HAS_ERROR_FILTER else []),
        ("ui /ui/runs?created_before=6 days ago",
         "/ui/runs?" + q({"created_before": fx.old.isoformat()})),
        ("ui /ui/runs deep page", "/ui/runs?" + q({"cursor": deep})),
        ("ui /ui/runs/<workflow>", f"/ui/runs/{fx.workflow}"),
    ]


def timed(calls: list[tuple[str, Callable[[], httpx.Response]]], reps: int,
          warmup: int) -> dict[str, dict[str, Any]]:
    """Each call `warmup + reps` times, in rounds (every call once per round), so a busy
    moment on the machine lands on all of them rather than on one page."""
    ms: dict[str, list[float]] = {name: [] for name, _ in calls}
    last: dict[str, tuple[int, int]] = {}
    for i in range(warmup + reps):
        for name, fn in calls:
            t0 = time.perf_counter()
            response = fn()
            body = response.content
            elapsed = (time.perf_counter() - t0) * 1000
            last[name] = (response.status_code, len(body))
            if i >= warmup:
                ms[name].append(elapsed)
    return {name: {"median_ms": statistics.median(v), "p95_ms": pct(v, 0.95),
                   "max_ms": max(v), "min_ms": min(v), "n": len(v),
                   "status": last[name][0], "bytes": last[name][1]}
            for name, v in ms.items()}


def sign_in(client: httpx.Client, token: str) -> None:
    response = client.post("/ui/login", data={"token": token, "name": "bench", "next": "/ui/"},
                           headers={"origin": str(client.base_url).rstrip("/")})
    if response.status_code != 303 or "jobd_session" not in client.cookies:
        raise RuntimeError(f"sign-in failed: {response.status_code} {response.text[:200]}")


# -- statements ----------------------------------------------------------------------------

def filter_args(**filters: Any) -> list[Any]:
    return [filters.get(f) for f in FILTER_FIELDS]


def statements(fx: Fixture) -> list[tuple[str, str, list[Any]]]:
    """(name, SQL, parameters) for every statement behind the targets, with the page's
    parameters (the default page size 50 and list_field_bytes 4096)."""
    def page(cursor: int | None = None, **filters: Any) -> list[Any]:
        return [*filter_args(**filters), cursor, 50, 4096]
    lj = control_sql.LIST_JOBS
    return [
        ("LIST_JOBS (first page)", lj, page()),
        ("LIST_JOBS state=failed", lj, page(state=["failed"])),
        ("LIST_JOBS kind=crawl.fetch", lj, page(kind="crawl.fetch")),
        (f"LIST_JOBS kind={RARE_KIND}", lj, page(kind=RARE_KIND)),
        ("LIST_JOBS queue=crawl key=site-7", lj, page(queue="crawl", key="site-7")),
        ("LIST_JOBS tag=nightly", lj, page(tag="nightly")),
        (f"LIST_JOBS tag={fx.batch_tag}", lj, page(tag=fx.batch_tag)),
        ("LIST_JOBS state=available", lj, page(state=["available"])),
        ("LIST_JOBS created_before=6 days ago", lj, page(created_before=fx.old)),
        ("LIST_JOBS deep page", lj, page(cursor=fx.oldest + 100)),
        ("LIST_JOBS state=failed deep page", lj, page(cursor=fx.oldest + 100_000,
                                                      state=["failed"])),
        *([("LIST_JOBS error=<rare text>", lj, page(error="certificate verify"))]
          if HAS_ERROR_FILTER else []),
        ("GET_JOB", jobs_sql.GET_JOB, [fx.workflow]),
        ("WORKFLOW_DETAILS", workflows_sql.WORKFLOW_DETAILS, [fx.workflow]),
        ("SUMMARIZE_JOBS (all)", control_sql.SUMMARIZE_JOBS, filter_args()),
        (f"SUMMARIZE_JOBS tag={fx.batch_tag}", control_sql.SUMMARIZE_JOBS,
         filter_args(tag=fx.batch_tag)),
        ("STATS", jobs_sql.STATS, []),
        ("KEY_STATS", flow_sql.KEY_STATS, [None, 200]),
        ("QUEUE_COUNTS (metrics leader)", metrics_sql.QUEUE_COUNTS, []),
        ("KEY_STATS before r24 (one state IN pass)", KEY_STATS_BEFORE, [None, 200]),
    ]


# KEY_STATS as it was before its per-index arms (sql/flow.py), timed beside the current
# one in the same rounds.
KEY_STATS_BEFORE = flow_sql.KEY_STATS.split("WITH counts AS (")[0] + """WITH counts AS (
    SELECT queue, key, count(*) FILTER (WHERE state = 'running') AS running,
           count(*) FILTER (WHERE state <> 'running') AS queued
    FROM jobd.jobs
    WHERE state IN ('available', 'scheduled', 'running') AND key IS NOT NULL
      AND ($1::text IS NULL OR queue = $1)
    GROUP BY queue, key
)""" + flow_sql.KEY_STATS.split("GROUP BY queue, key\n)", 1)[1]

_EXEC = re.compile(r"Execution Time: ([0-9.]+) ms")


def explain_all(db: PgConn, named: list[tuple[str, str, list[Any]]],
                reps: int) -> dict[str, Any]:
    """Postgres's own execution time of each statement (median of `reps` EXPLAIN ANALYZE
    runs after one warming run) and the last run's plan, under the custom plan asyncpg
    gets first and the generic plan a prepared statement may switch to after five runs.
    Rounds are interleaved (every statement once per round), so a busy moment on the
    machine lands on all of them, not on one."""
    times: dict[tuple[str, str], list[float]] = {}
    plans: dict[tuple[str, str], str] = {}
    for round_no in range(reps + 1):
        for mode in ("custom", "generic"):
            db.execute(f"SET plan_cache_mode = force_{mode}_plan")
            try:
                for name, sql, params in named:
                    rows = db.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *params)
                    plan = "\n".join(r[0] for r in rows)
                    m = _EXEC.search(plan)
                    if round_no:
                        times.setdefault((name, mode), []).append(
                            float(m.group(1)) if m else float("nan"))
                    plans[(name, mode)] = plan
            finally:
                db.execute("RESET plan_cache_mode")
    return {name: {mode: {"median_ms": statistics.median(times[(name, mode)]),
                          "max_ms": max(times[(name, mode)]), "plan": plans[(name, mode)]}
                   for mode in ("custom", "generic")}
            for name, _, _ in named}


# Fixes considered and not taken, each an index jobd does not have: built here for the
# measurement (then dropped), so the numbers behind the decision can be re-made.
# (name, the index, statements to time with it: (name, SQL, params)).
STATS_ARMS = """
SELECT queue, state, n FROM (
    SELECT queue, state, count(*) AS n FROM jobd.jobs
    WHERE state IN ('available', 'scheduled') GROUP BY queue, state
    UNION ALL
    SELECT queue, state, count(*) FROM jobd.jobs WHERE state = 'running' GROUP BY queue, state
    UNION ALL
    SELECT queue, state, count(*) FROM jobd.jobs WHERE state = 'waiting' GROUP BY queue, state
    UNION ALL
    SELECT queue, 'completed', count(*) FROM jobd.jobs WHERE state = 'completed' GROUP BY queue
    UNION ALL
    SELECT queue, 'failed', count(*) FROM jobd.jobs WHERE state = 'failed' GROUP BY queue
    UNION ALL
    SELECT queue, 'cancelled', count(*) FROM jobd.jobs WHERE state = 'cancelled' GROUP BY queue
    UNION ALL
    SELECT queue, state, count(*) FROM jobd.jobs WHERE state = 'skipped' GROUP BY queue, state
) arms
ORDER BY queue, state
"""


def candidates(db: PgConn, fx: Fixture, reps: int) -> dict[str, Any]:
    def page(**filters: Any) -> list[Any]:
        return [*filter_args(**filters), None, 50, 4096]
    tried = [
        ("jobs_finished with INCLUDE (queue), stats as one arm per partial index",
         "CREATE INDEX bench_finished_q ON jobd.jobs (state, finished_at) INCLUDE (queue) "
         "WHERE state IN ('completed', 'failed', 'cancelled')",
         [("STATS (current)", jobs_sql.STATS, []), ("STATS arms", STATS_ARMS, [])]),
        ("(kind, id)", "CREATE INDEX bench_kind ON jobd.jobs (kind, id)",
         [(f"LIST_JOBS kind={RARE_KIND}", control_sql.LIST_JOBS, page(kind=RARE_KIND))]),
    ]
    out: dict[str, Any] = {}
    for name, ddl, named in tried:
        index = ddl.split()[2]
        db.execute(ddl)
        try:
            db.execute("VACUUM ANALYZE jobd.jobs")
            size = db.fetchval(f"SELECT pg_relation_size('jobd.{index}')") / 2**20
            timed_with = explain_all(db, named, reps)
            cpu = {n: pg_cpu_ms(db, sql, params, reps) for n, sql, params in named}
        finally:
            db.execute(f"DROP INDEX jobd.{index}")
        out[name] = {"index": ddl, "size_mb": size, "statements": timed_with,
                     "pg_cpu_ms_per_call": cpu}
        for n in timed_with:
            print(f"  candidate {name}: {n} {timed_with[n]['custom']['median_ms']:.1f} ms, "
                  f"{cpu[n]:.1f} ms Postgres CPU", flush=True)
    return out


def pg_cpu_ms(db: PgConn, sql: str, params: list[Any], reps: int) -> float:
    """Postgres CPU per run (the backend plus any parallel workers), from the cluster's
    process times: a parallel plan can be as fast as a serial one and cost three times
    the CPU."""
    postmaster = db.fetchval("SELECT pid FROM pg_stat_activity WHERE backend_type = "
                             "'checkpointer'")  # a child of the postmaster
    ppid = int(_stat_fields(postmaster)[1])
    c0 = pg_cluster_cpu(ppid)
    for _ in range(reps):
        db.fetch(sql, *params)
    return (pg_cluster_cpu(ppid) - c0) / reps * 1000


# -- main ---------------------------------------------------------------------------------

def table(rows: list[tuple[str, dict[str, Any]]], title: str) -> str:
    width = max([len(name) for name, _ in rows] + [len(title)])
    lines = [f"{title:<{width}}  {'median ms':>10}  {'p95 ms':>8}  {'max ms':>8}  status"]
    for name, r in rows:
        lines.append(f"{name:<{width}}  {r['median_ms']:>10.1f}  {r['p95_ms']:>8.1f}  "
                     f"{r['max_ms']:>8.1f}  {r.get('status', '')}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--explain-reps", type=int, default=5)
    parser.add_argument("--database-url", default=None,
                        help="a server to create the bench database on (dropped afterwards)")
    parser.add_argument("--pg-dir", default=None,
                        help="keep the embedded cluster here; a seeded table of --jobs is reused")
    parser.add_argument("--only", default="",
                        help="comma-separated parts: api,ui,sql,candidates")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    parts = set(args.only.split(",")) if args.only else {"api", "ui", "sql", "candidates"}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {"command": " ".join(["python -m bench.dashboard_pages", *sys.argv[1:]]),
                               "at": stamp, "jobs": args.jobs, "reps": args.reps}
    with tempfile.TemporaryDirectory(prefix="jobd-dashboard-w-") as work, database(args) as url:
        workdir = Path(work)
        token = secrets.token_urlsafe(24)
        token_file = workdir / "token"
        token_file.write_text(token + "\n")
        port = free_port()
        boot = daemon(workdir / "boot", url, token_file, port)
        boot.start()  # applies jobd's migrations
        stop([boot])
        db = PgConn(url)
        try:
            have = db.fetchval("SELECT count(*) FROM jobd.jobs")
            if have != args.jobs or not args.pg_dir:
                print(f"seeding {args.jobs:,} jobs", flush=True)
                results["seed"] = seed(db, args.jobs)
                print(f"  {results['seed']}", flush=True)
            pause_all(db)
            results["table"] = {
                "by_state": dict(db.fetch("SELECT state, count(*) FROM jobd.jobs GROUP BY 1")),
                "size_mb": db.fetchval("SELECT pg_total_relation_size('jobd.jobs')") / 2**20,
                "steps": db.fetchval("SELECT count(*) FROM jobd.job_steps"),
            }
            fx = Fixture(db)
            proc = daemon(workdir / "d", url, token_file, port)
            proc.start()
            try:
                time.sleep(2.0)  # the first reaper and metrics passes run at start
                base = f"http://127.0.0.1:{port}"
                api = httpx.Client(base_url=base, timeout=60,
                                   headers={"authorization": f"Bearer {token}"})
                ui = httpx.Client(base_url=base, timeout=60)
                calls: list[tuple[str, Callable[[], httpx.Response]]] = []
                if "api" in parts:
                    for name, path, body in api_targets(fx):
                        def call(path: str = path, body: Any = body) -> httpx.Response:
                            return api.get(path) if body is None else api.post(path, json=body)
                        calls.append((name, call))
                if "ui" in parts and dashboard_available():
                    sign_in(ui, token)
                    calls += [(name, lambda path=path: ui.get(path))
                              for name, path in ui_targets(fx)]
                elif "ui" in parts:
                    results["ui_skipped"] = "daemon/dashboard/pages.py not on this branch yet"
                if not HAS_ERROR_FILTER:
                    results["error_filter_skipped"] = "no `error` in FILTER_FIELDS on this branch"
                try:
                    timings = timed(calls, args.reps, args.warmup)
                finally:
                    api.close()
                    ui.close()
                results["pages"] = timings
            finally:
                stop([proc])
            plans: dict[str, Any] = {}
            if "sql" in parts:
                plans = explain_all(db, statements(fx), args.explain_reps)
            results["statements"] = plans
            if "candidates" in parts:
                results["candidates"] = candidates(db, fx, args.explain_reps)
        finally:
            db.close()
    out = args.out or ROOT / "bench" / "results" / f"dashboard-{stamp}.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    if results.get("pages"):
        print(table(list(results["pages"].items()), f"page ({args.jobs:,} jobs, HTTP, warm)"))
    for c in results.get("candidates", {}).values():
        print(f"\ncandidate index {c['index']} ({c['size_mb']:.0f} MB):")
        for n, p in c["statements"].items():
            print(f"  {n}: {p['custom']['median_ms']:.1f} ms median (EXPLAIN ANALYZE), "
                  f"{c['pg_cpu_ms_per_call'][n]:.1f} ms Postgres CPU per call")
    if results["statements"]:
        print()
        rows = [(f"{n} [{kind}]", {"median_ms": p[kind]["median_ms"], "p95_ms": float("nan"),
                                  "max_ms": p[kind]["max_ms"]})
                for n, p in results["statements"].items() for kind in ("custom", "generic")]
        print(table(rows, "statement (EXPLAIN ANALYZE)"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
