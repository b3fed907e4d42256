"""Queue features through the real daemon and `jobctl`: cancel, retries, batches, errors,
progress. One daemon per test; waits poll for a state with a generous deadline."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

DEADLINE_S = 30.0


def wait_for(daemon, job_id: int, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        job = daemon.jobctl_json("get", str(job_id))
        if done(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} never got there; last seen: {job}")
        time.sleep(0.05)


def enqueue(daemon, kind: str, *options: str) -> int:
    return int(daemon.jobctl("enqueue", kind, *options).stdout)


def error_of(result) -> dict[str, Any]:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)["error"]


@pytest.fixture
def daemon(jobd):
    return jobd()


def test_cancel_a_running_job_with_progress_visible(daemon, sql):
    job_id = enqueue(daemon, "sleep", "--args", '{"seconds": 30, "steps": 300}')
    running = wait_for(daemon, job_id,
                       lambda j: j["state"] == "running" and j["progress"] is not None)
    assert 0 < running["progress"] < 100
    assert running["progress_note"].startswith("step ")
    assert running["lease_owner"]

    cancelled = daemon.jobctl_json("cancel", str(job_id))
    assert cancelled == {"id": job_id, "was": "running", "state": "cancelling"}
    job = wait_for(daemon, job_id, lambda j: j["state"] not in ("running",))
    assert job["state"] == "cancelled"
    assert job["cancel_requested"] is False
    assert [e["class"] for e in job["errors"]] == ["cancelled"]
    assert job["finished_at"] is not None
    assert sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", job_id) == "cancelled"


def test_cancel_a_queued_delayed_job(daemon):
    job_id = enqueue(daemon, "noop", "--delay", "3600")
    assert daemon.jobctl_json("get", str(job_id))["state"] == "scheduled"
    assert daemon.jobctl_json("cancel", str(job_id)) == {
        "id": job_id, "was": "scheduled", "state": "cancelled"}
    job = daemon.jobctl_json("get", str(job_id))
    assert (job["state"], job["attempt"], job["errors"]) == ("cancelled", 0, [])
    assert error_of(daemon.jobctl("--json", "cancel", "999999", check=False))["code"] == \
        "not_found"


def test_retries_are_visible_in_the_errors(daemon):
    job_id = enqueue(daemon, "flaky", "--args", '{"failures": 2}')
    job = wait_for(daemon, job_id, lambda j: j["state"] in ("completed", "failed"))
    assert (job["state"], job["attempt"], job["result"]) == ("completed", 3, {"attempts": 3})
    assert [(e["attempt"], e["class"], e["type"]) for e in job["errors"]] == [
        (1, "unknown", "RuntimeError"), (2, "unknown", "RuntimeError")]
    assert job["errors"][0]["message"] == "planned failure 1/2"

    fatal = enqueue(daemon, "flaky", "--args", '{"fatal": true}')
    job = wait_for(daemon, fatal, lambda j: j["state"] in ("completed", "failed"))
    assert (job["state"], job["attempt"]) == ("failed", 1)
    assert [e["class"] for e in job["errors"]] == ["fail"]


def test_batch_enqueue_from_an_args_file(daemon, tmp_path):
    args_file = tmp_path / "args.jsonl"
    args_file.write_text('{"failures": 0}\n\n{"failures": 0}\n{"failures": 0}\n')
    done = daemon.jobctl_json("enqueue", "flaky", "--args-file", str(args_file),
                              "--tag", "batch")
    assert done["created"] == 3 and len(set(done["ids"])) == 3
    for job_id in done["ids"]:
        job = wait_for(daemon, job_id, lambda j: j["state"] == "completed")
        assert (job["tags"], job["result"]) == (["batch"], {"attempts": 1})


def test_unique_key_through_jobctl(daemon):
    first = daemon.jobctl_json("enqueue", "noop", "--delay", "3600", "--unique-key", "u")
    again = daemon.jobctl_json("enqueue", "noop", "--unique-key", "u")
    assert again["id"] == first["id"]
    assert again["state"] == "scheduled"


def test_unknown_kind_and_invalid_args_are_rejected_at_enqueue(daemon, tmp_path, sql):
    unknown = error_of(daemon.jobctl("--json", "enqueue", "nosuch", check=False))
    assert unknown["code"] == "unknown_kind"
    assert unknown["details"] == {"kind": "nosuch"}

    invalid = error_of(daemon.jobctl("--json", "enqueue", "sleep", "--args",
                                     '{"seconds": "long"}', check=False))
    assert invalid["code"] == "invalid_args"
    assert "$.seconds" in invalid["message"]

    args_file = tmp_path / "args.jsonl"
    args_file.write_text('{"seconds": 1}\n{"seconds": "x"}\n')
    batch = error_of(daemon.jobctl("--json", "enqueue", "sleep", "--args-file", str(args_file),
                                   check=False))
    assert batch["code"] == "invalid_args"
    assert batch["details"] == {"kind": "sleep", "index": 1}

    human = daemon.jobctl("enqueue", "nosuch", check=False)
    assert human.returncode == 1 and "unknown_kind" in human.stderr
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs") == 0
