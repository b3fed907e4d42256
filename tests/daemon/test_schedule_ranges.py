"""Schedule values out of range (issue 14, item 13): refused at every edge with a typed
error, refused by the database, and a stored row that slipped through anyway is
skipped by the scheduler while the other schedules fire."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from importlib import resources

import msgspec
import pytest

import examples.basic  # noqa: F401 - registers the `noop` kind the schedules fire
from actors.handlers import HANDLERS
from actors.ports import NullObserver
from actors.runtime.mailbox import Mailbox
from actors.schedule_jobs import definition
from actors.services.scheduler import Scheduler, SchedulerSettings
from daemon.config import ConfigError, load
from protocol.schedules import ScheduleSpec

T0 = datetime(2025, 10, 14, 4, 0, 0, tzinfo=UTC)

HUGE = [1e12, 1e16, 1e308, 2**63 - 1, 10**30]


class Counting(NullObserver):
    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []

    def maintenance_error(self, actor: str, step: str) -> None:
        self.errors.append((actor, step))


def scheduler(store, observer=None) -> Scheduler:
    return Scheduler(Mailbox("scheduler"), store, SchedulerSettings(), handlers=HANDLERS, config_schedules=list,
                     observer=observer or NullObserver(), clock=None)  # type: ignore[arg-type]


def drop_schedule_checks(sql) -> None:
    """This is about a row that slipped in anyway (an older daemon, a dropped
    constraint): remove every CHECK on the values (0008's or 0013's) first."""
    for row in sql.fetch(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'jobd.schedules'::regclass"
            " AND contype = 'c' AND conname NOT IN ('schedules_timing', 'schedules_missed',"
            " 'schedules_source')"):
        sql.execute(f'ALTER TABLE jobd.schedules DROP CONSTRAINT "{row["conname"]}"')


def insert(sql, name: str, **columns) -> None:
    values = {"kind": "noop", "every_s": 1.0, "handled_until": T0, **columns}
    names = ", ".join(values)
    marks = ", ".join(f"${i}" for i in range(2, len(values) + 2))
    sql.execute(f"INSERT INTO jobd.schedules (name, {names}) VALUES ($1, {marks})",
                name, *values.values())


# --------------------------------------------------------------------------- the edges


@pytest.mark.parametrize("field", ["every", "grace", "jitter"])
@pytest.mark.parametrize("value", HUGE + [-1, float("nan"), float("inf")])
def test_the_protocol_refuses_durations_out_of_range(field, value):
    with pytest.raises(msgspec.ValidationError, match=field):
        msgspec.convert({"name": "s", "kind": "noop", "every": "1s", field: value},
                        ScheduleSpec)


@pytest.mark.parametrize("options, field", [
    ({"every": "99999999999d"}, "every"), ({"grace": "99999999999d"}, "grace"),
    ({"jitter": "99999999999d"}, "jitter"), ({"every": 1e308}, "every"),
    ({"grace": 1e16}, "grace"), ({"jitter": 10**30}, "jitter"),
    ({"every": float("nan")}, "every"), ({"grace": float("nan")}, "grace"),
    ({"tz": "x" * 3000}, "time zone"), ({"tz": "../../../etc/passwd"}, "time zone"),
    ({"tz": "Europe/\ud800"}, "time zone"), ({"timeout_s": float("nan")}, "timeout_s"),
    ({"timeout_s": 1e308}, "timeout_s"), ({"max_attempts": 2**40}, "max_attempts"),
    ({"priority": 40_000}, "priority"),
])
def test_definition_turns_every_bad_value_into_a_value_error(options, field):
    """A spec built in Python skips the decoder's ranges; definition(HANDLERS, ) still refuses."""
    options.setdefault("every", "1s")
    with pytest.raises(ValueError, match=field):
        definition(HANDLERS, ScheduleSpec(name="s", kind="noop", **options))


@pytest.mark.parametrize("line, message", [
    ('every = 1e308', "every"), ('every = nan', "every"), ('grace = inf', "grace"),
    ('grace = "99999999999d"', "grace"), ('jitter = "99999999999d"', "jitter"),
    ('tz = "' + "x" * 3000 + '"', "tz"),
])
def test_the_config_refuses_them_with_the_path(tmp_path, line, message):
    path = tmp_path / "jobd.toml"
    body = '[[schedules]]\nname = "s"\nkind = "noop"\n'
    path.write_text(body + ("" if line.startswith("every") else 'every = "1s"\n') + line + "\n")
    with pytest.raises(ConfigError, match=message):
        load(path, environ={})


# --------------------------------------------------------------------------- the database


@pytest.mark.parametrize("column, value", [
    ("every_s", 1e308), ("every_s", float("nan")), ("every_s", float("inf")),
    ("grace_s", 1e16), ("grace_s", float("nan")), ("jitter_s", 1e30), ("jitter_s", -1.0),
    ("tz", "x" * 3000), ("timeout_s", float("nan")), ("max_attempts", 2**30),
    ("priority", 40_000),
])
async def test_a_check_refuses_a_stored_value_out_of_range(store, sql, column, value):
    import asyncpg

    with pytest.raises(asyncpg.exceptions.CheckViolationError):
        insert(sql, "bad", **{column: value})


async def test_the_migration_pauses_and_normalises_existing_bad_rows(store, sql):
    drop_schedule_checks(sql)
    insert(sql, "fine", every_s=60.0)
    insert(sql, "bad_every", every_s=1e308)
    insert(sql, "bad_grace", grace_s=float("nan"), jitter_s=1e30, tz="x" * 3000)
    migration = resources.files("daemon.store").joinpath(
        "migrations/0013_schedule_ranges.sql").read_text()
    sql.execute(migration)
    rows = {r["name"]: r for r in sql.fetch(
        "SELECT name, paused, every_s, grace_s, jitter_s, tz, revision FROM jobd.schedules")}
    assert (rows["fine"]["paused"], rows["fine"]["revision"]) == (False, 1)
    assert (rows["bad_every"]["paused"], rows["bad_every"]["every_s"]) == (True, 3600)
    bad = rows["bad_grace"]
    assert (bad["paused"], bad["grace_s"], bad["jitter_s"], bad["tz"], bad["revision"]) == (
        True, 60, 0, "UTC", 2)
    # The constraint is back: the next bad row is refused.
    import asyncpg

    with pytest.raises(asyncpg.exceptions.CheckViolationError):
        insert(sql, "again", every_s=1e308)


# --------------------------------------------------------------------------- the scheduler


async def test_the_scheduler_skips_a_stored_row_out_of_range_and_fires_the_others(
        store, sql, caplog):
    drop_schedule_checks(sql)
    insert(sql, "good", every_s=1.0)
    insert(sql, "every", every_s=1e308)
    insert(sql, "every_nan", every_s=float("nan"))
    insert(sql, "grace", grace_s=1e16)
    insert(sql, "jitter", jitter_s=1e30)
    insert(sql, "tz", tz="x" * 3000)
    insert(sql, "timeout", timeout_s=float("nan"))
    observer = Counting()
    s = scheduler(store, observer)
    caplog.set_level(logging.WARNING, "jobd.scheduler")
    for step in (1, 2, 3):
        report = await s.tick(T0 + timedelta(seconds=step))
        assert (report.fired, report.broken) == (1, 6)
        assert report.next_in_s is not None and 0 < report.next_in_s <= 1
    assert sql.fetchval("SELECT count(*) FROM jobd.schedule_fires WHERE schedule = 'good'") == 3
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 3
    skipped = [r for r in caplog.records if r.__dict__.get("event") == "scheduler.cannot_fire"]
    assert sorted(r.__dict__["schedule"] for r in skipped) == sorted(
        ["every", "every_nan", "grace", "jitter", "tz", "timeout"])  # once each
    assert observer.errors == [("scheduler", "schedule")] * 18  # counted every pass


async def test_a_fire_postgres_refuses_skips_that_schedule_only(store, sql, caplog):
    """A value no range check here covers (a stricter CHECK on jobs, as another
    version's migration may add) refuses the one statement that fires every due
    schedule: each is then fired alone and only the refused one is skipped."""
    sql.execute("ALTER TABLE jobd.jobs ADD CONSTRAINT stricter CHECK (key IS DISTINCT FROM"
                " 'refused')")
    insert(sql, "good", every_s=1.0)
    insert(sql, "refused_key", every_s=1.0, key="refused")
    insert(sql, "also_good", every_s=1.0)
    observer = Counting()
    caplog.set_level(logging.WARNING, "jobd.scheduler")
    report = await scheduler(store, observer).tick(T0 + timedelta(seconds=1))
    assert (report.fired, report.broken) == (2, 1)
    assert sorted(r["schedule"] for r in sql.fetch("SELECT schedule FROM jobd.schedule_fires")
                  ) == ["also_good", "good"]
    assert observer.errors == [("scheduler", "schedule")]
    assert any("refused_key" in r.getMessage() for r in caplog.records)


async def test_list_shows_a_broken_row_and_trigger_refuses_it(store, sql):
    from actors.services import schedule_commands
    from protocol import commands as c
    from protocol.errors import BadRequest

    drop_schedule_checks(sql)
    insert(sql, "good", every_s=60.0)
    insert(sql, "every", every_s=1e308)
    insert(sql, "tz", tz="x" * 3000)
    listed = await schedule_commands.handle(store, HANDLERS, c.ScheduleList(id=1))
    views = {v.name: v for v in listed.schedules}
    assert views["good"].broken is None and views["good"].next_fire_at is not None
    for name in ("every", "tz"):
        assert views[name].next_fire_at is None and views[name].broken
    assert "time zone" in views["tz"].broken
    with pytest.raises(BadRequest, match="every"):
        await schedule_commands.handle(store, HANDLERS, c.ScheduleTrigger(id=2, name="every"))
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 0


async def test_a_config_schedule_the_database_refuses_is_logged_and_the_rest_written(
        store, sql, caplog):
    """A CHECK stricter than this daemon's ranges (another version's migration): the
    config schedule it refuses is logged and skipped, the others are written."""
    sql.execute("ALTER TABLE jobd.schedules ADD CONSTRAINT stricter CHECK (grace_s < 3600)")
    specs = [ScheduleSpec(name="strict", kind="noop", every="1s", grace="2h"),
             ScheduleSpec(name="fine", kind="noop", every="1s")]
    observer = Counting()
    s = Scheduler(Mailbox("scheduler"), store, SchedulerSettings(), handlers=HANDLERS,
                  config_schedules=lambda: specs, observer=observer,
                  clock=None)  # type: ignore[arg-type]
    caplog.set_level(logging.ERROR, "jobd.scheduler")
    await s.sync_config()
    assert [r["name"] for r in sql.fetch("SELECT name FROM jobd.schedules")] == ["fine"]
    assert observer.errors == [("scheduler", "config")]
    assert any(r.__dict__.get("event") == "scheduler.config_invalid" for r in caplog.records)
