"""Schedule values out of range on a real daemon (issue 14, item 13): the socket answers
bad_request, and a stored row that slipped in anyway (a dropped CHECK, an older daemon)
is skipped by the scheduler while the other schedules fire, before and after a restart.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from tests.support import wait_until

HELLO = {"id": 1, "type": "hello", "protocol": 1, "client": "ranges"}


def ask(daemon, command: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(daemon.socket))
        reader = conn.makefile("rb")
        for message in (HELLO, {"id": 2, **command}):
            conn.sendall(json.dumps(message).encode() + b"\n")
            reply = json.loads(reader.readline())
        return reply


def test_out_of_range_schedule_values_are_bad_requests(jobd):
    daemon = jobd()
    for field, value in (("every", 1e308), ("every", 2**63 - 1), ("every", "99999999999d"),
                         ("grace", 1e308), ("grace", 10**30), ("jitter", 10**30),
                         ("tz", "x" * 3000), ("timeout_s", 1e308)):
        schedule = {"name": "s", "kind": "noop", "every": "1h", field: value}
        reply = ask(daemon, {"type": "schedule_add", "schedule": schedule})
        assert reply["type"] == "error" and reply["code"] == "bad_request", (field, reply)
        assert field in reply["message"] or "time zone" in reply["message"], reply
    assert daemon.jobctl_json("schedules", "list")["schedules"] == []
    assert daemon.jobctl_json("ping")["ready"] is True


def test_a_stored_row_out_of_range_is_skipped_and_the_rest_fire(jobd, sql):
    daemon = jobd()
    for row in sql.fetch(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'jobd.schedules'::regclass"
            " AND contype = 'c' AND conname NOT IN ('schedules_timing', 'schedules_missed',"
            " 'schedules_source')"):
        sql.execute(f'ALTER TABLE jobd.schedules DROP CONSTRAINT "{row["conname"]}"')
    bad = {"every": ("every_s", 1e308), "grace": ("grace_s", 1e16),
           "jitter": ("jitter_s", 1e30), "tz": ("tz", "x" * 3000),
           "nan": ("every_s", float("nan"))}
    for name, (column, value) in bad.items():
        sql.execute(f"INSERT INTO jobd.schedules (name, kind, every_s, {column})"
                    f" VALUES ($1, 'noop', 1, $2)" if column != "every_s" else
                    "INSERT INTO jobd.schedules (name, kind, every_s) VALUES ($1, 'noop', $2)",
                    name, value)
    # Added over the socket: its NOTIFY wakes the scheduler, which reads all rows.
    daemon.jobctl_json("schedules", "add", "tick", "--kind", "noop", "--every", "1s")

    def fires() -> int:
        return sql.fetchval("SELECT count(*) FROM jobd.schedule_fires WHERE schedule = 'tick'")

    wait_until(lambda: fires() >= 2, "the good schedule to fire", daemons=(daemon,))
    skipped = {e.get("schedule") for e in daemon.log_events()
               if e.get("event") == "scheduler.cannot_fire"}
    assert skipped == set(bad)
    listed = {s["name"]: s for s in daemon.jobctl_json("schedules", "list")["schedules"]}
    assert all(listed[name]["broken"] for name in bad) and listed["tick"]["broken"] is None
    assert "broken" in daemon.jobctl("schedules", "list").stdout

    # A restart used to die again on the same row; now it comes up and goes on firing.
    daemon.kill()
    daemon.start()
    before = fires()
    wait_until(lambda: fires() >= before + 2, "fires after the restart", daemons=(daemon,))
    assert "stopped on an error" not in daemon.log_text()
    assert sql.fetchval("SELECT count(*) FROM jobd.schedule_fires WHERE schedule <> 'tick'") == 0
    assert daemon.jobctl_json("ping")["ready"] is True
