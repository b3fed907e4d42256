"""The daily fan-out example (examples/daily_predictions.py) on a real daemon: a
schedule's job enqueues prompt × model × run children keyed by the occurrence's date;
triggering the same day twice creates each child once; `jobctl summary --tag DAY`
shows the day's totals."""

from __future__ import annotations

from tests.e2e.test_crash import wait_until

PROMPTS = ["rain in Riga?", "EUR/USD close?", "top story?"]
MODELS = ["small", "large"]
RUNS = 2
N = len(PROMPTS) * len(MODELS) * RUNS

SCHEDULE = f"""
[[schedules]]
name = "daily-predictions"
kind = "predictions.daily"
cron = "0 6 * * *"
tz = "Europe/Berlin"
args = {{ prompts = {PROMPTS!r}, models = {MODELS!r}, runs = {RUNS}, tz = "Europe/Berlin" }}
""".replace("'", '"')


def job(daemon, job_id: int) -> dict:
    return daemon.jobctl_json("get", str(job_id))


def summary(daemon, day: str) -> dict:
    return daemon.jobctl_json("summary", "--tag", day)


def trigger_and_finish(daemon, at: str) -> dict:
    fired = daemon.jobctl_json("schedules", "trigger", "daily-predictions", "--at", at)
    assert fired["created"] is True
    parent = wait_until(f"the parent fired for {at}", lambda: (
        (j := job(daemon, fired["job_id"]))["state"] == "completed" and j), daemons=(daemon,))
    return parent


def test_daily_fanout_creates_each_child_once_per_day(jobd, sql):
    daemon = jobd(modules=["examples.daily_predictions"], extra_toml=SCHEDULE)

    first = trigger_and_finish(daemon, "2025-10-14T06:00:00+02:00")
    assert first["result"] == {"day": "2025-10-14", "children": N, "created": N}
    wait_until("the day's children to finish",
               lambda: summary(daemon, "2025-10-14")["completed"] == N, daemons=(daemon,))

    # A second trigger the same day (here 09:00 local, another occurrence) runs the
    # parent again; every child already exists (finished), so nothing new is created.
    second = trigger_and_finish(daemon, "2025-10-14T09:00:00+02:00")
    assert second["result"] == {"day": "2025-10-14", "children": N, "created": 0}
    totals = summary(daemon, "2025-10-14")
    assert {k: totals[k] for k in ("total", "queued", "running", "completed", "failed",
                                   "cancelled")} == {
        "total": N, "queued": 0, "running": 0, "completed": N, "failed": 0, "cancelled": 0}
    human = daemon.jobctl("summary", "--tag", "2025-10-14").stdout
    assert f"total {N}" in human and f"completed {N}" in human

    rows = sql.fetch("SELECT unique_key, parent_id, args::text AS args FROM jobd.jobs"
                     " WHERE kind = 'predictions.predict'")
    assert len(rows) == N
    assert len({r["unique_key"] for r in rows}) == N
    assert {r["parent_id"] for r in rows} == {first["id"]}

    # The next day is its own batch.
    third = trigger_and_finish(daemon, "2025-10-15T06:00:00+02:00")
    assert third["result"]["created"] == N
    wait_until("the next day's children", lambda: summary(daemon, "2025-10-15")["total"] == N,
               daemons=(daemon,))
    assert summary(daemon, "2025-10-14")["total"] == N
