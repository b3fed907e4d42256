"""Schedules on real daemons: three daemons share an `every = "1s"` schedule for 20 s
and SIGKILLs land right at fire time; Postgres must hold exactly one job per
occurrence with no gap. Plus the control surface (`jobctl schedules ...`) and a
run-time schedule surviving a restart.

No timing assertions beyond "eventually": waits poll until generous deadlines.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

from tests.e2e.test_crash import wait_for_dead_sessions, wait_until

TICK = """
[[schedules]]
name = "tick"
kind = "noop"
every = "1s"
"""
RUN_S = 20.0


def fires(sql) -> list:
    return [r["fire_at"] for r in sql.fetch(
        "SELECT fire_at FROM jobd.schedule_fires WHERE schedule = 'tick' ORDER BY fire_at")]


def kill_at_fire_time(daemon) -> None:
    """SIGKILL a few milliseconds after a whole second: while that second's fire runs."""
    now = time.time()
    time.sleep((1.0 - now % 1.0) + 0.003)
    daemon.kill()


def test_three_daemons_fire_each_second_exactly_once(jobd, sql):
    options = {"extra_toml": TICK, "jobs": {"lease": "2s", "reaper_interval": "0.5s"}}
    daemons = [jobd(**options) for _ in range(3)]
    wait_until("the first fire", lambda: fires(sql), daemons=tuple(daemons))
    started = time.monotonic()
    # Kill each of two daemons at a fire, restart the first; one daemon always lives.
    time.sleep(5)
    kill_at_fire_time(daemons[0])
    time.sleep(4)
    daemons[0].start()
    time.sleep(3)
    kill_at_fire_time(daemons[1])
    time.sleep(max(0.0, RUN_S - (time.monotonic() - started)))
    for d in daemons:
        d.kill()
    wait_for_dead_sessions(sql)

    got = fires(sql)
    assert len(got) >= RUN_S - 2, got
    # No gap: every second from the first fire to the last has its fire.
    steps = {b - a for a, b in zip(got, got[1:], strict=False)}
    assert steps == {timedelta(seconds=1)}, [(a, b) for a, b in zip(got, got[1:], strict=False)
                                            if b - a != timedelta(seconds=1)]
    # No duplicate: one job per occurrence, keyed and tagged by it.
    jobs = sql.fetch("SELECT id, unique_key, tags FROM jobd.jobs WHERE kind = 'noop'")
    assert len(jobs) == len(got)
    keys = [j["unique_key"] for j in jobs]
    assert len(set(keys)) == len(keys)
    assert sorted(keys) == sorted(f"schedule:tick:{t.isoformat()}" for t in got)
    assert all(f"fire:{t.isoformat()}" in j["tags"]
               for j in jobs for t in got if j["unique_key"].endswith(t.isoformat()))
    linked = sql.fetchval("SELECT count(*) FROM jobd.schedule_fires f"
                          " JOIN jobd.jobs j ON j.id = f.job_id WHERE f.schedule = 'tick'")
    assert linked == len(got)


def test_jobctl_schedules_and_restart(jobd, sql):
    daemon = jobd()
    out = daemon.jobctl_json("schedules", "add", "hourly", "--kind", "noop", "--cron", "0 * * * *",
                             "--tz", "America/New_York", "--jitter", "10s", "--missed", "skip")
    assert (out["name"], out["cron"], out["tz"], out["jitter_s"], out["missed"]) == (
        "hourly", "0 * * * *", "America/New_York", 10.0, "skip")
    assert out["next_fire_at"] is not None and out["source"] == "runtime"
    assert daemon.jobctl("schedules", "add", "hourly", "--kind", "noop", "--every", "5s",
                         check=False).returncode == 1  # exists; --replace overwrites
    bad = daemon.jobctl("--json", "schedules", "add", "x", "--kind", "nope", "--every", "1s",
                        check=False)
    assert json.loads(bad.stdout)["error"]["code"] == "unknown_kind"

    paused = daemon.jobctl_json("schedules", "pause", "hourly")
    assert paused["paused"] is True and paused["next_fire_at"] is None
    fired = daemon.jobctl_json("schedules", "trigger", "hourly")
    assert fired["created"] is True
    job = daemon.jobctl_json("get", str(fired["job_id"]))
    assert "schedule:hourly" in job["tags"]

    # Run-time schedules live in Postgres: a restarted daemon still has them, paused.
    daemon.kill()
    daemon.start()
    [listed] = daemon.jobctl_json("schedules", "list")["schedules"]
    assert (listed["name"], listed["paused"], listed["last_job_id"]) == (
        "hourly", True, fired["job_id"])
    assert daemon.jobctl_json("schedules", "resume", "hourly")["paused"] is False
    assert "hourly" in daemon.jobctl("schedules", "list").stdout
    daemon.jobctl("schedules", "remove", "hourly")
    assert daemon.jobctl_json("schedules", "list")["schedules"] == []
    missing = daemon.jobctl("--json", "schedules", "remove", "hourly", check=False)
    assert json.loads(missing.stdout)["error"]["code"] == "not_found"


def test_a_config_schedule_is_written_at_start(jobd, sql):
    daemon = jobd(extra_toml=TICK.replace('every = "1s"', 'cron = "30 2 * * *"\ntz = "Europe/Berlin"'))
    [s] = daemon.jobctl_json("schedules", "list")["schedules"]
    assert (s["name"], s["cron"], s["tz"], s["source"]) == ("tick", "30 2 * * *",
                                                           "Europe/Berlin", "config")
