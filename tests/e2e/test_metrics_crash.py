"""Metrics stay consistent through SIGKILLs: scraped every 0.2 s while a daemon works
through 2,000 `effect` jobs and is killed and restarted twice.

Every scrape: no gauge sample is negative. Within one process (one `daemon_id` on
`jobd_daemon_info`): every counter sample (`*_total`, histogram `_bucket`/`_count`/`_sum`)
never decreases and never disappears between consecutive scrapes. Across processes the
counters start over, and the restarted daemon's counters agree with the database: it
counts exactly the jobs the killed one held as `rescued`, and completes (and counts as
`completed`) exactly the jobs that were not yet done when it started. Each process,
the only daemon on its database, comes to lead (`jobd_metrics_leader` 1) once its
killed predecessor's session, and the leader lock with it, is gone.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_crash import enqueue_batch, wait_for_dead_sessions, wait_until
from tests.e2e.test_http_e2e import TOKEN, free_port, request
from tests.support import JobdProcess, Sql

N_JOBS = 2_000
KILL_AT = (0.25, 0.6)  # fractions of the jobs completed before each SIGKILL
SCRAPE_EVERY_S = 0.2
MIN_SCRAPES = 5  # per process before it may be killed, so each one is really watched
JOBS = {"lease": "2s", "reaper_interval": "0.5s", "poll_interval": "0.5s",
        "retention.completed_max_count": 1_000_000}
MONOTONIC_SUFFIXES = ("_total", "_bucket", "_count", "_sum")

Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class Scrape:
    at: float
    daemon_id: str
    gauges: dict[Key, float] = field(default_factory=dict)
    counters: dict[Key, float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        """Sum of the counter samples named `name` whose labels include `labels`."""
        return sum(v for (n, ls), v in self.counters.items()
                   if n == name and labels.items() <= dict(ls).items())


def parse(text: str, at: float) -> Scrape:
    scrape = Scrape(at=at, daemon_id="")
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            if family.type == "gauge":
                scrape.gauges[key] = s.value
                if s.name == "jobd_daemon_info":
                    scrape.daemon_id = s.labels["daemon_id"]
            elif (family.type in ("counter", "histogram", "summary")
                  and s.name.endswith(MONOTONIC_SUFFIXES)):
                scrape.counters[key] = s.value
    assert scrape.daemon_id, "a scrape without jobd_daemon_info"
    return scrape


class Scraper(threading.Thread):
    """GETs /metrics of whichever daemon `base` names, every SCRAPE_EVERY_S, until stopped.

    A scrape that fails (the daemon is dead or not yet listening) is skipped.
    """

    def __init__(self) -> None:
        super().__init__(name="scraper", daemon=True)
        self.base: str | None = None
        self.scrapes: list[Scrape] = []
        self.failed = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(SCRAPE_EVERY_S):
            base = self.base
            if base is None:
                continue
            try:
                status, _, body = request(base, "GET", "/metrics", token=None)
            except (OSError, http.client.HTTPException):
                # A daemon SIGKILLed mid-reply leaves a short body (IncompleteRead).
                self.failed += 1
                continue
            if status == 200:
                self.scrapes.append(parse(body.decode(), time.monotonic()))
            else:
                self.failed += 1

    def of(self, daemon_id: str) -> list[Scrape]:
        return [s for s in self.scrapes if s.daemon_id == daemon_id]


def start_daemon(jobd, tmp_path: Path, scraper: Scraper) -> tuple[JobdProcess, str]:
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()  # a new one each time: nothing waits on the dead daemon's socket
    daemon = jobd(queues={"effects": {"concurrency": 20}}, jobs=JOBS,
                  control={"http": f"127.0.0.1:{port}", "token_file": str(token_file)},
                  extra_toml='[metrics]\nleader_interval = "200ms"\n')
    scraper.base = f"http://127.0.0.1:{port}"
    return daemon, daemon.jobctl_json("ping")["daemon_id"]


def check_consistency(scrapes: list[Scrape]) -> dict[str, int]:
    """The per-scrape and per-process rules; returns the number of scrapes per process."""
    order: list[str] = []
    for s in scrapes:
        negative = {k: v for k, v in s.gauges.items() if v < 0}
        assert not negative, f"negative gauges from {s.daemon_id}: {negative}"
        if not order or order[-1] != s.daemon_id:
            assert s.daemon_id not in order, f"daemon {s.daemon_id} came back"
            order.append(s.daemon_id)
    for daemon_id in order:
        mine = [s for s in scrapes if s.daemon_id == daemon_id]
        for before, after in zip(mine, mine[1:], strict=False):
            for key, old in before.counters.items():
                new = after.counters.get(key)
                assert new is not None, f"{daemon_id}: counter {key} disappeared"
                assert new >= old, f"{daemon_id}: counter {key} went down {old} -> {new}"
    return Counter(s.daemon_id for s in scrapes)


def led(scrapes: list[Scrape]) -> bool:
    return any(s.gauges.get(("jobd_metrics_leader", ())) == 1 for s in scrapes)


def completed(sql: Sql) -> int:
    return sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE state = 'completed'")


def test_metrics_consistent_through_sigkills(jobd, sql, tmp_path):
    sql.execute("CREATE TABLE effects ("
                " job_id bigint, name text, attempt int, at timestamptz DEFAULT now())")
    rng = random.Random()
    scraper = Scraper()
    scraper.start()
    started = time.monotonic()
    try:
        daemon, daemon_id = start_daemon(jobd, tmp_path, scraper)
        args = [{"name": f"m{i}", "hold_s": round(rng.uniform(0.01, 0.08), 4)}
                for i in range(N_JOBS)]
        ids = enqueue_batch(daemon, tmp_path, "effect", args)
        assert len(set(ids)) == N_JOBS
        daemon_ids = [daemon_id]
        rescued_expected = 0  # jobs the previous kill left running: this daemon rescues them
        for n, fraction in enumerate(KILL_AT):
            target = int(N_JOBS * fraction)

            def ready_to_kill(target=target, daemon_id=daemon_id,
                              rescued_expected=rescued_expected) -> bool:
                mine = scraper.of(daemon_id)
                return (len(mine) >= MIN_SCRAPES and led(mine)
                        and mine[-1].value("jobd_jobs_finished_total",
                                           outcome="rescued") == rescued_expected
                        and completed(sql) >= target)

            wait_until(f"kill {n + 1}: {target} jobs done, {MIN_SCRAPES} scrapes, leading and"
                       f" {rescued_expected} rescues counted", ready_to_kill, daemons=(daemon,))
            time.sleep(rng.uniform(0.0, 0.2))
            daemon.kill()
            wait_for_dead_sessions(sql)
            rescued_expected = sql.fetchval(
                "SELECT count(*) FROM jobd.jobs WHERE state = 'running'")
            done_before = completed(sql)
            daemon, daemon_id = start_daemon(jobd, tmp_path, scraper)
            daemon_ids.append(daemon_id)
        wait_until(f"all {N_JOBS} jobs completed", lambda: completed(sql) == N_JOBS,
                   daemons=(daemon,))

        # The last daemon's counters agree with the database: every job still to do when
        # it started was completed by it, and it rescued exactly what the kill left running.
        def final_counts() -> Scrape | None:
            mine = scraper.of(daemon_id)
            last = mine[-1] if mine else None
            if last and led(mine) and last.value("jobd_jobs_finished_total",
                                                 outcome="completed") >= N_JOBS - done_before:
                return last
            return None

        last = wait_until("the final daemon's counters to catch up", final_counts,
                          daemons=(daemon,), timeout=30)
    finally:
        scraper.halt.set()
        scraper.join(5)
    elapsed = time.monotonic() - started

    assert len(set(daemon_ids)) == 3
    per_process = check_consistency(scraper.scrapes)
    assert set(per_process) == set(daemon_ids), (per_process, daemon_ids)
    assert all(per_process[d] >= MIN_SCRAPES for d in daemon_ids), per_process
    finished = {dict(ls)["outcome"]: v for (name, ls), v in last.counters.items()
                if name == "jobd_jobs_finished_total"}
    assert finished.get("completed") == N_JOBS - done_before, (finished, done_before)
    assert finished.get("rescued", 0) == rescued_expected, (finished, rescued_expected)
    assert finished.get("rescued", 0) + finished.get("completed", 0) > 0
    print(f"{len(scraper.scrapes)} scrapes ({dict(per_process)}), {scraper.failed} failed"
          f" while a daemon was down; final daemon finished {finished}; {elapsed:.1f}s")
