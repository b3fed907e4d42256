"""Every client-set field of every command has a type and a range in the Structs: a bad
value is refused at decode, naming the field, before any actor or Postgres sees it."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from protocol import commands as c
from protocol.jobs import JOB_STATES, JobView

JOB = {"kind": "sleep"}
SCHEDULE = {"name": "s", "kind": "noop", "every": "1m"}

# (request, the path msgspec names). Each one was accepted (or reached Postgres or an
# actor as `internal`) before the ranges were stated.
BAD: list[tuple[dict[str, Any], str]] = [
    ({"type": "enqueue", "job": {**JOB, "timeout_s": 1e308}}, "$.job.timeout_s"),
    ({"type": "enqueue", "job": {**JOB, "timeout_s": 0}}, "$.job.timeout_s"),
    ({"type": "enqueue", "job": {**JOB, "timeout_s": -1}}, "$.job.timeout_s"),
    ({"type": "enqueue", "job": {**JOB, "timeout_s": "RAW:1e400"}}, "$.job.timeout_s"),
    ({"type": "enqueue", "job": {**JOB, "delay_s": 1e16}}, "$.job.delay_s"),
    ({"type": "enqueue", "job": {**JOB, "delay_s": -1}}, "$.job.delay_s"),
    ({"type": "enqueue", "job": {**JOB, "priority": 40000}}, "$.job.priority"),
    ({"type": "enqueue", "job": {**JOB, "priority": -40000}}, "$.job.priority"),
    ({"type": "enqueue", "job": {**JOB, "max_attempts": 0}}, "$.job.max_attempts"),
    ({"type": "enqueue", "job": {**JOB, "max_attempts": 1001}}, "$.job.max_attempts"),
    ({"type": "enqueue", "job": {**JOB, "max_attempts": 2**70}}, "$.job.max_attempts"),
    ({"type": "enqueue", "job": {**JOB, "cost": -1}}, "$.job.cost"),
    ({"type": "enqueue", "job": {**JOB, "cost": 2**40}}, "$.job.cost"),
    ({"type": "enqueue", "job": {**JOB, "run_at": "not a time"}}, "$.job.run_at"),
    ({"type": "enqueue", "job": {**JOB, "key": "k" * 513}}, "$.job.key"),
    ({"type": "enqueue", "job": {**JOB, "key": ""}}, "$.job.key"),
    ({"type": "enqueue", "job": {**JOB, "unique_key": "u" * 3000}}, "$.job.unique_key"),
    ({"type": "enqueue", "job": {**JOB, "tags": ["t" * 257]}}, "$.job.tags[0]"),
    ({"type": "enqueue", "job": {**JOB, "tags": ["t"] * 101}}, "$.job.tags"),
    ({"type": "enqueue", "job": {**JOB, "queue": "q" * 101}}, "$.job.queue"),
    ({"type": "enqueue", "job": {**JOB, "queue": ""}}, "$.job.queue"),
    ({"type": "enqueue", "job": {"kind": ""}}, "$.job.kind"),
    ({"type": "enqueue", "job": {"kind": "x" * 201}}, "$.job.kind"),
    ({"type": "enqueue", "job": {**JOB, "args": []}}, "$.job.args"),
    ({"type": "enqueue_batch", "jobs": [JOB, {**JOB, "timeout_s": "1h"}]}, "$.jobs[1].timeout_s"),
    ({"type": "get", "job_id": 2**63}, "$.job_id"),
    ({"type": "get", "job_id": 0}, "$.job_id"),
    ({"type": "get", "job_id": "1"}, "$.job_id"),
    ({"type": "cancel", "job_id": -1}, "$.job_id"),
    ({"type": "watch", "job_id": 2**64}, "$.job_id"),
    ({"type": "watch", "job_id": 1, "interval_s": 0}, "$.interval_s"),
    ({"type": "list", "state": ["nosuchstate"]}, "$.state[0]"),
    ({"type": "list", "state": "failed"}, "$.state"),
    ({"type": "list", "ids": [2**63]}, "$.ids[0]"),
    ({"type": "list", "cursor": 2**63}, "$.cursor"),
    ({"type": "list", "limit": 0}, "$.limit"),
    ({"type": "list", "key": "k" * 2000}, "$.key"),
    ({"type": "summary", "created_after": "yesterday"}, "$.created_after"),
    ({"type": "retry", "ids": [1], "dry_run": "yes"}, "$.dry_run"),
    ({"type": "pause", "queue": ""}, "$.queue"),
    ({"type": "pause", "queue": "default", "key": "k" * 600}, "$.key"),
    ({"type": "resume", "queue": "q" * 101}, "$.queue"),
    ({"type": "send_event", "name": ""}, "$.name"),
    ({"type": "send_event", "name": "e", "data": [1]}, "$.data"),
    ({"type": "hello", "protocol": 2**40}, "$.protocol"),
    ({"type": "ping", "id": 2**64}, "$.id"),
    ({"type": "schedule_add", "schedule": {**SCHEDULE, "every": 1e308}}, "$.schedule.every"),
    ({"type": "schedule_add", "schedule": {**SCHEDULE, "grace": -5}}, "$.schedule.grace"),
    ({"type": "schedule_add", "schedule": {**SCHEDULE, "timeout_s": 1e308}},
     "$.schedule.timeout_s"),
    ({"type": "schedule_add", "schedule": {**SCHEDULE, "priority": 99999}},
     "$.schedule.priority"),
    ({"type": "schedule_add", "schedule": {**SCHEDULE, "max_attempts": 5000}},
     "$.schedule.max_attempts"),
    ({"type": "schedule_add", "schedule": {**SCHEDULE, "key": "k" * 600}}, "$.schedule.key"),
    ({"type": "schedule_add", "schedule": {**SCHEDULE, "tz": ""}}, "$.schedule.tz"),
    ({"type": "schedule_remove", "name": "x" * 101}, "$.name"),
    ({"type": "schedule_trigger", "name": "s", "at": 5}, "$.at"),
]

NUL = "a\u0000b"
# Postgres text cannot hold U+0000: each of these reached the database as an error.
NUL_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"type": "enqueue", "job": {"kind": NUL}}, "$.job.kind"),
    ({"type": "enqueue", "job": {**JOB, "queue": NUL}}, "$.job.queue"),
    ({"type": "enqueue", "job": {**JOB, "key": NUL}}, "$.job.key"),
    ({"type": "enqueue", "job": {**JOB, "unique_key": NUL}}, "$.job.unique_key"),
    ({"type": "enqueue", "job": {**JOB, "tags": ["ok", NUL]}}, "$.job.tags[1]"),
    ({"type": "list", "queue": NUL}, "$.queue"),
    ({"type": "list", "kind": NUL}, "$.kind"),
    ({"type": "list", "key": NUL}, "$.key"),
    ({"type": "list", "tag": NUL}, "$.tag"),
    ({"type": "delete", "unique_key": NUL}, "$.unique_key"),
    ({"type": "pause", "queue": NUL}, "$.queue"),
    ({"type": "resume", "queue": "default", "key": NUL}, "$.key"),
    ({"type": "send_event", "name": NUL}, "$.name"),
    ({"type": "schedule_add", "schedule": {**SCHEDULE, "kind": NUL}}, "$.schedule.kind"),
    ({"type": "schedule_add", "schedule": {**SCHEDULE, "tz": NUL}}, "$.schedule.tz"),
    ({"type": "schedule_add", "schedule": {**SCHEDULE, "cron": NUL, "every": None}},
     "$.schedule.cron"),
    ({"type": "schedule_pause", "name": NUL}, "$.name"),
    ({"type": "hello", "protocol": 1, "client": NUL}, "$.client"),
]


@pytest.mark.parametrize(("request_", "path"), BAD + NUL_FIELDS,
                         ids=[p + ":" + str(r["type"]) for r, p in BAD + NUL_FIELDS])
def test_out_of_range_values_are_refused_naming_the_field(request_: dict[str, Any], path: str):
    with pytest.raises(msgspec.ValidationError) as info:
        c.command_decoder.decode(json.dumps(request_).replace('"RAW:1e400"', "1e400").encode())
    assert f"at `{path}`" in str(info.value)


def test_an_unknown_state_is_refused_with_the_valid_ones():
    with pytest.raises(msgspec.ValidationError) as info:
        c.command_decoder.decode(b'{"type": "list", "state": ["failed", "nosuchstate"]}')
    assert all(state in str(info.value) for state in JOB_STATES)
    ok = c.command_decoder.decode(json.dumps({"type": "list", "state": list(JOB_STATES)}).encode())
    assert ok.state == list(JOB_STATES)


def test_values_at_the_limits_are_accepted():
    spec = {"kind": "k" * 200, "queue": "q" * 100, "key": "é" * 512, "unique_key": "😀" * 512,
            "tags": ["t" * 256] * 100, "priority": -32768, "max_attempts": 1000,
            "timeout_s": 365 * 86400, "delay_s": 10 * 365 * 86400, "cost": 0}
    cmd = c.command_decoder.decode(json.dumps({"type": "enqueue", "job": spec}).encode())
    assert cmd.job.key == "é" * 512 and cmd.job.timeout_s == 365 * 86400
    # Four-byte characters at the limit still fit a btree entry (about 2.7 KB).
    assert len(cmd.job.unique_key.encode()) == 2048
    assert c.command_decoder.decode(b'{"type": "get", "job_id": 9223372036854775807}').job_id \
        == 2**63 - 1


def test_replies_carry_a_warning_and_the_truncated_fields():
    assert c.EnqueueResult(id=1, created=True).warning is None
    assert msgspec.json.decode(b'{"id": 1, "created": true, "warning": "w"}',
                               type=c.EnqueueResult).warning == "w"
    assert "truncated" in JobView.__struct_fields__


def test_json_nested_past_the_depth_limit_is_a_decode_error():
    deep = b'{"type": "enqueue", "job": {"kind": "k", "args": {"a": ' + b"[" * 5000 \
        + b"]" * 5000 + b"}}}"
    for decoder in (c.command_decoder, c.envelope_decoder):
        with pytest.raises(msgspec.DecodeError, match="nested too deeply"):
            decoder.decode(deep)
