"""bench/run.py's table: medians with spreads, the performance issue's targets with
their verdicts (ratios against the peer's best setting), failures and notes kept
visible, and the table reprinted from a results file. No timing here: the numbers are
made up; the bench itself is where real ones are measured."""

from __future__ import annotations

import json

from bench import run


def results() -> run.Results:
    res = run.Results()
    for jobs_per_s, bulk in ((10_000.0, 30_000.0), (9_000.0, 47_000.0), (11_000.0, 35_000.0)):
        res.add("jobd", "e2e_1", {"jobs_per_s": jobs_per_s})
        res.add("jobd", "enqueue", {"enqueue_bulk_jobs_per_s": bulk})
    for jobs_per_s in (4_000.0, 5_000.0, 3_000.0):
        res.add("pgqueuer", "e2e_1", {"jobs_per_s": jobs_per_s})
        res.add("pgqueuer b10", "e2e_1", {"jobs_per_s": jobs_per_s + 1_000})
    res.add("jobd", "lat_idle", {"p99_ms": 8.0})
    res.add("pgqueuer", "lat_idle", {"p99_ms": 12.0})
    res.add("pgqueuer b10", "lat_idle", {"p99_ms": 6.0})
    res.add("jobd", "bridge", {"store_call_cpu_us": 255.0})
    res.add("jobd", "workflows", {"wf3_jobs_per_s": 3_300.0})
    res.add("dbos", "workflows", {"wf3_jobs_per_s": 300.0})
    res.add("jobd", "depth_small", {"claim_jobs_per_s": 10_000.0})
    res.add("jobd", "depth_big", {"claim_jobs_per_s": 7_000.0})
    res.note("pgqueuer", "workflows", "n/a: no durable workflows")
    res.note("pgqueuer", "enqueue", "error: ConnectionRefusedError: boom")
    return res


SYSTEMS = ["jobd", "pgqueuer", "pgqueuer b10", "dbos"]


def row(table: str, label: str) -> str:
    [line] = [line for line in table.splitlines() if line.startswith(label)]
    return line


def test_rows_show_median_and_spread():
    table = run.render(results(), SYSTEMS, 3)
    e2e = row(table, "2 e2e 1 daemon, jobs/s")
    assert "10,000 (9,000-11,000)" in e2e and "4,000 (3,000-5,000)" in e2e
    assert "5,000 (4,000-6,000)" in e2e


def test_targets_compare_with_the_peer_at_its_best_setting():
    table = run.render(results(), SYSTEMS, 3)
    # Throughput: the faster of pgqueuer's two batch sizes is the denominator.
    e2e = row(table, "e2e 1 daemon, jobd / best pgqueuer")
    assert "2.00x (10,000.0 / 5,000.0 pgqueuer b10)" in e2e and e2e.endswith("ok   >= 2")
    # Latency: the lower p99 of the two is what jobd must match.
    p99 = row(table, "idle p99, jobd / best pgqueuer")
    assert "1.33x (8.0 / 6.0 pgqueuer b10)" in p99 and p99.endswith("MISS <= 1")
    assert row(table, "bridge: daemon CPU per store call, us").endswith("MISS <= 150")
    assert row(table, "three-step wf / jobd's no-op e2e").endswith("ok   >= 0.3")
    assert "11.00x" in row(table, "three-step wf, jobd / DBOS")
    claim = row(table, "claim with a big queue / 10k queued")
    assert "0.70x" in claim and claim.endswith("MISS >= 0.8")


def test_a_target_without_its_numbers_says_so():
    table = run.render(results(), SYSTEMS, 3)
    assert "not measured" in row(table, "suspend+resume, jobs/s")
    assert "not measured" in row(table, "bulk enqueue, jobd / pgqueuer")  # pgqueuer failed


def test_failures_and_notes_stay_visible():
    table = run.render(results(), SYSTEMS, 3)
    assert "error [!]" in row(table, "1 bulk enqueue, jobs/s")
    assert "[!] pgqueuer enqueue: error: ConnectionRefusedError: boom" in table
    assert "n/a: no durable workflows" in row(table, "6 memoized step, us")
    assert "median (min-max) over 3 repetition(s)" in table.splitlines()


def test_the_table_reprints_from_a_results_file(tmp_path):
    res = results()
    table = run.render(res, SYSTEMS, 3)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"meta": {"reps": 3, "systems": SYSTEMS}, "raw": res.raw,
                                "notes": res.notes, "table": table}))
    assert run.table_from(path) == table
