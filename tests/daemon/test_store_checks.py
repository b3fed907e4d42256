"""Migration 0008 against a real Postgres: the CHECK constraints every writer meets, the
SQL `jobd.enqueue` refusing bad values, old bad rows normalised, the settings and the
served queues, and list pages that leave large fields out."""

from __future__ import annotations

import asyncio
import math
import secrets
from typing import Any

import asyncpg
import msgspec
import pytest

from actors.ports import NewJob, ValueRejected
from daemon.store import migrate
from protocol.commands import List
from tests.support import run_async


def enqueue_sql(url: str, call: str, *args: Any) -> tuple[Any, list[str]]:
    """(result, warnings) of one `SELECT jobd.enqueue(...)`."""

    async def main() -> tuple[Any, list[str]]:
        conn = await asyncpg.connect(url)
        notices: list[str] = []
        conn.add_log_listener(lambda _c, message: notices.append(message.message))
        try:
            value = await conn.fetchval(f"SELECT {call}", *args)
            await asyncio.sleep(0)  # let the listener run
            return value, notices
        finally:
            await conn.close()

    return run_async(main)


# --------------------------------------------------------------------------- CHECKs


@pytest.mark.parametrize(("column", "value"), [
    ("timeout_s", "NaN"), ("timeout_s", "Infinity"), ("timeout_s", "1e16"), ("timeout_s", "0"),
    ("timeout_s", "-1"), ("run_at", "-infinity"), ("run_at", "infinity"),
    ("created_at", "infinity"), ("max_attempts", "0"), ("max_attempts", "20000"),
    ("attempt", "-1"), ("cost", "0"), ("progress", "101"), ("progress", "NaN"),
])
async def test_a_direct_insert_must_meet_the_checks(store, sql, column: str, value: str):
    cast = _type(column)
    with pytest.raises(asyncpg.CheckViolationError):
        sql.execute(f"INSERT INTO jobd.jobs (kind, {column}) VALUES ('noop', $1::text::{cast})",
                    value)
    # Nor may an update make a good row bad.
    job_id = sql.fetchval("INSERT INTO jobd.jobs (kind) VALUES ('noop') RETURNING id")
    with pytest.raises(asyncpg.CheckViolationError):
        sql.execute(f"UPDATE jobd.jobs SET {column} = $1::text::{cast} WHERE id = $2",
                    value, job_id)


def _type(column: str) -> str:
    if column.endswith("_at"):
        return "timestamptz"
    return {"timeout_s": "float8", "progress": "real"}.get(column, "int")


async def test_the_daemon_path_turns_a_check_violation_into_a_bad_value(store):
    # The edge refuses these first; this is the database's safety net behind it.
    with pytest.raises(ValueRejected):
        await store.enqueue_many([NewJob(kind="noop", timeout_s=1e308)])
    with pytest.raises(ValueRejected):
        await store.enqueue_many([NewJob(kind="noop", max_attempts=0)])
    # (NaN cannot get there this way: the rows travel as JSON, where msgspec writes null.)
    [nan] = await store.enqueue_many([NewJob(kind="noop", timeout_s=math.nan)])
    assert (await store.get_job(nan.id))["timeout_s"] is None
    with pytest.raises(ValueRejected):  # over the btree row limit (~2.7 KB)
        await store.enqueue_many([NewJob(kind="noop", unique_key=secrets.token_hex(10_000))])
    [ok] = await store.enqueue_many([NewJob(kind="noop", timeout_s=31536000)])
    assert ok.created


# --------------------------------------------------------------------------- jobd.enqueue


@pytest.mark.parametrize(("call", "field"), [
    ("jobd.enqueue('noop', timeout_s => 'NaN')", "timeout_s"),
    ("jobd.enqueue('noop', timeout_s => 'Infinity')", "timeout_s"),
    ("jobd.enqueue('noop', timeout_s => 1e16)", "timeout_s"),
    ("jobd.enqueue('noop', timeout_s => 0)", "timeout_s"),
    ("jobd.enqueue('noop', run_at => '-infinity')", "run_at"),
    ("jobd.enqueue('noop', run_at => 'infinity')", "run_at"),
    ("jobd.enqueue('noop', run_at => now() + interval '20 years')", "run_at"),
    ("jobd.enqueue('noop', max_attempts => 0)", "max_attempts"),
    ("jobd.enqueue('noop', max_attempts => 5000)", "max_attempts"),
    ("jobd.enqueue('noop', max_attempts => NULL)", "max_attempts"),
    ("jobd.enqueue('')", "kind"),
    ("jobd.enqueue(NULL)", "kind"),
    ("jobd.enqueue('noop', queue => '')", "queue"),
    ("jobd.enqueue('noop', queue => NULL)", "queue"),
    ("jobd.enqueue('noop', key => repeat('k', 513))", "key"),
    ("jobd.enqueue('noop', key => '')", "key"),
    ("jobd.enqueue('noop', unique_key => repeat('u', 3000))", "unique_key"),
    ("jobd.enqueue('noop', tags => array_fill('t'::text, ARRAY[101]))", "tags"),
    ("jobd.enqueue('noop', tags => ARRAY[repeat('t', 257)])", "tags"),
    ("jobd.enqueue('noop', tags => ARRAY[NULL::text])", "tags"),
    ("jobd.enqueue('noop', args => '[1, 2]')", "args"),
    ("jobd.enqueue('noop', args => 'null')", "args"),
    ("jobd.enqueue('noop', priority => NULL)", "priority"),
])
async def test_jobd_enqueue_refuses_bad_values_naming_them(store, fresh_database, sql,
                                                           call: str, field: str):
    with pytest.raises(asyncpg.InvalidParameterValueError) as info:
        enqueue_sql(fresh_database, call)
    assert info.value.message.startswith(f"jobd.enqueue: {field} ")
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 0


async def test_jobd_enqueue_refuses_args_over_the_daemons_limit(store, fresh_database, sql):
    big = msgspec.json.encode({"blob": "x" * 1_100_000}).decode()
    with pytest.raises(asyncpg.ProgramLimitExceededError) as info:  # default: 1 MiB
        enqueue_sql(fresh_database, "jobd.enqueue('noop', args => $1::jsonb)", big)
    assert "1048576" in info.value.message and "limits.max_args_bytes" in info.value.message
    await store.put_settings({"max_args_bytes": 2048})
    small = msgspec.json.encode({"blob": "x" * 2100}).decode()
    with pytest.raises(asyncpg.ProgramLimitExceededError) as info:
        enqueue_sql(fresh_database, "jobd.enqueue('noop', args => $1::jsonb)", small)
    assert "2048" in info.value.message
    await store.put_settings({"max_args_bytes": 4096})  # a later daemon's limit wins
    job_id, _ = enqueue_sql(fresh_database, "jobd.enqueue('noop', args => $1::jsonb)", small)
    assert sql.fetchval("SELECT octet_length(args::text) FROM jobd.jobs WHERE id = $1",
                        job_id) > 2048


async def test_jobd_enqueue_warns_when_no_live_daemon_serves_the_queue(store, fresh_database):
    job_id, notices = enqueue_sql(fresh_database, "jobd.enqueue('noop', queue => 'nosuchqueue')")
    assert job_id is not None
    assert notices == [f"jobd.enqueue: no live daemon serves queue nosuchqueue; job {job_id} "
                       "waits until one does"]
    await store.register_daemon("d1", "r", "h", 1, "v")
    await store.set_daemon_queues("d1", ["default", "crawl"])
    assert sorted(await store.live_queues(60)) == ["crawl", "default"]
    _, notices = enqueue_sql(fresh_database, "jobd.enqueue('noop', queue => 'crawl')")
    assert notices == []
    await store.heartbeat("d1", 30, "ok", False)
    assert await store.live_queues(0.0) == []  # a stale heartbeat serves nothing


async def test_jobd_enqueue_still_enqueues_good_values(store, fresh_database, sql):
    job_id, _ = enqueue_sql(
        fresh_database, "jobd.enqueue('noop', '{\"a\": 1}', 'default', 'k', 'u1', 2::smallint, "
        "now() + interval '1 hour', 5, ARRAY['x'], 30)")
    again, _ = enqueue_sql(fresh_database, "jobd.enqueue('noop', unique_key => 'u1')")
    assert again == job_id
    row = sql.fetch("SELECT state, timeout_s, max_attempts, key FROM jobd.jobs")[0]
    assert (row["state"], row["timeout_s"], row["max_attempts"], row["key"]) == (
        "scheduled", 30, 5, "k")


# --------------------------------------------------------------------------- the migration


def test_the_migration_fails_and_normalises_rows_that_break_the_checks(fresh_database):
    async def main() -> list[Any]:
        conn = await asyncpg.connect(fresh_database)
        try:
            await conn.execute("CREATE SCHEMA jobd; CREATE TABLE jobd.migrations ("
                               " version integer PRIMARY KEY, name text NOT NULL,"
                               " applied_at timestamptz NOT NULL DEFAULT now())")
            for version, name, text in migrate.available():
                if version < 8:
                    await conn.execute(text)
                    await conn.execute("INSERT INTO jobd.migrations VALUES ($1, $2)", version, name)
            # What 0007's jobd.enqueue and a direct INSERT let in.
            await conn.execute("SELECT jobd.enqueue('noop', timeout_s => 'NaN')")
            await conn.execute("SELECT jobd.enqueue('noop', run_at => '-infinity')")
            await conn.execute("INSERT INTO jobd.jobs (kind, state, timeout_s, lease_owner, "
                               "lease_until, started_at, attempt) VALUES ('noop', 'running', "
                               "1e308, 'gone', now(), now(), 1)")
            await conn.execute("INSERT INTO jobd.jobs (kind, state, timeout_s, finished_at) "
                               "VALUES ('noop', 'completed', 'Infinity', now())")
            await conn.execute("INSERT INTO jobd.jobs (kind, timeout_s) VALUES ('noop', 60)")
            await conn.execute("INSERT INTO jobd.schedules (name, kind, every_s, grace_s) "
                               "VALUES ('bad', 'noop', 1e300, 'NaN')")
            assert (await migrate.apply(conn))[0] == "0008_value_checks.sql"  # then later ones
            return [await conn.fetch("SELECT id, state, timeout_s, run_at, lease_owner, "
                                     "errors::text, finished_at FROM jobd.jobs ORDER BY id"),
                    await conn.fetchrow("SELECT * FROM jobd.schedules")]
        finally:
            await conn.close()

    jobs, schedule = run_async(main)
    nan_timeout, minus_inf, running, completed, good = jobs
    for row in (nan_timeout, minus_inf, running):
        assert row["state"] == "failed" and row["finished_at"] is not None
        [error] = msgspec.json.decode(row["errors"])
        assert error["class"] == "invalid_value"
        assert error["message"].startswith("stored with a value jobd refuses: ")
    assert "timeout_s NaN" in msgspec.json.decode(nan_timeout["errors"])[0]["message"]
    assert "run_at -infinity" in msgspec.json.decode(minus_inf["errors"])[0]["message"]
    assert nan_timeout["timeout_s"] is None and running["timeout_s"] is None
    assert running["lease_owner"] is None
    assert completed["state"] == "completed" and completed["timeout_s"] is None
    assert good["state"] == "available" and good["errors"] == "[]" and good["timeout_s"] == 60
    assert schedule["paused"] and schedule["every_s"] == 3600 and schedule["grace_s"] == 60


# --------------------------------------------------------------------------- list pages


async def test_list_leaves_out_large_fields_and_names_them(store, sql):
    [big, small] = await store.enqueue_many([
        NewJob(kind="k", args=msgspec.json.encode({"blob": "a" * 10_000}).decode()),
        NewJob(kind="k", args='{"n": 1}')])
    result = msgspec.json.encode({"page": "r" * 2_500_000}).decode()
    sql.execute("UPDATE jobd.jobs SET result = $1::jsonb, progress_note = $2, "
                "errors = $3::jsonb WHERE id = $4", result, "n" * 9000,
                msgspec.json.encode([{"attempt": 1, "class": "x", "message": "m" * 9000}]).decode(),
                big.id)
    rows = {r["id"]: r for r in await store.list_jobs(List(), None, 10, field_bytes=4096)}
    assert rows[big.id]["args"] is None and rows[big.id]["result"] is None
    assert rows[big.id]["errors"] == "[]"
    assert rows[big.id]["progress_note"] == "n" * 1024
    assert list(rows[big.id]["truncated"]) == ["args", "result", "errors", "progress_note"]
    assert rows[small.id]["args"] == '{"n": 1}' and list(rows[small.id]["truncated"]) == []
    whole = await store.get_job(big.id)  # `get` still shows it all
    assert len(whole["result"]) > 2_500_000 and len(whole["progress_note"]) == 9000
