"""bench/run.py's table: medians with spreads, verdicts against the issue's targets, the
derived ratio rows, and failures and notes kept visible. No timing here: the numbers
are made up; the bench itself is where real ones are measured."""

from __future__ import annotations

from bench import run


def results() -> run.Results:
    res = run.Results()
    for jobs_per_s, bulk in ((10_000.0, 30_000.0), (9_000.0, 47_000.0), (11_000.0, 35_000.0)):
        res.add("jobd", "e2e_1", {"jobs_per_s": jobs_per_s})
        res.add("jobd", "enqueue", {"enqueue_bulk_jobs_per_s": bulk})
    for jobs_per_s in (4_000.0, 5_000.0, 3_000.0):
        res.add("pgqueuer", "e2e_1", {"jobs_per_s": jobs_per_s})
    res.add("jobd", "depth_small", {"claim_jobs_per_s": 10_000.0})
    res.add("jobd", "depth_big", {"claim_jobs_per_s": 7_000.0})
    res.note("pgqueuer", "workflows", "n/a: no durable workflows")
    res.note("pgqueuer", "enqueue", "error: ConnectionRefusedError: boom")
    return res


def row(table: str, label: str) -> str:
    [line] = [line for line in table.splitlines() if line.startswith(label)]
    return line


def test_rows_show_median_spread_and_verdict():
    table = run.render(results(), ["jobd", "pgqueuer"], 3)
    e2e = row(table, "2 e2e 1 daemon, jobs/s")
    assert "10,000 (9,000-11,000)" in e2e and "4,000 (3,000-5,000)" in e2e
    assert e2e.endswith("ok   >= 10,000")
    assert row(table, "1 bulk enqueue, jobs/s").endswith("MISS >= 50,000")


def test_derived_rows_compare_with_the_faster_peer_and_the_small_queue():
    table = run.render(results(), ["jobd", "pgqueuer"], 3)
    assert "2.5x" in row(table, "2 jobd / faster PG peer")
    assert row(table, "2 jobd / faster PG peer").endswith("ok   >= 2")
    ratio = row(table, "4 claim big/small ratio")
    assert "0.70" in ratio and ratio.endswith("MISS >= 0.8")


def test_failures_and_notes_stay_visible():
    table = run.render(results(), ["jobd", "pgqueuer"], 3)
    assert "error [!]" in row(table, "1 bulk enqueue, jobs/s")
    assert "[!] pgqueuer enqueue: error: ConnectionRefusedError: boom" in table
    assert "n/a: no durable workflows" in row(table, "6 memoized step, us")
    assert table.splitlines()[-2] == "median (min-max) over 3 repetition(s)"
