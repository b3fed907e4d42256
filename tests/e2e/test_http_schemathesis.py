"""Schemathesis fuzzes the live HTTP API from its own OpenAPI document.

A real `jobd run` with HTTP and a token gets a few jobs in settled states (completed,
failed, scheduled, cancelled); then every operation in `/v1/openapi.json` is called with
cases schemathesis generates from the schema (a bounded number per operation), and each
response is checked: never a 5xx, status code, content type and body as documented.

Operations that could change the seeded jobs or the daemon are constrained, not run
blind: bulk commands (`cancel_many`, `retry`, `replay`, `delete`) always carry
`dry_run: true`; `cancel` never names a seeded job; `pause` never names a configured
queue. `drain` and `reload` are not fuzzed at all (drain stops claiming, which is what
readiness reports; reload rereads the config file) and are covered by their own tests.
Afterwards the daemon must be healthy and ready, every seeded job exactly as it was,
and a new job must still complete.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import schemathesis  # in the `test` extra: a missing install fails, it does not skip
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (  # the public names of the built-in checks
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.test_http_e2e import TOKEN, free_port, request, wait_for

MAX_EXAMPLES = 25  # valid requests per operation
MAX_NEGATIVE_EXAMPLES = 15  # invalid ones (wrong types, missing fields) per operation
BULK = {"cancel_many", "retry", "replay", "delete"}
NOT_FUZZED = {"drain", "reload"}
QUEUES = {"default": {"concurrency": 20}, "final": {"concurrency": 2}}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
# An invalid request must be refused with a 4xx, never a 5xx, and the refusal documented.
NEGATIVE_CHECKS = [not_a_server_error, negative_data_rejection, status_code_conformance,
                   content_type_conformance, response_schema_conformance]


def job_view(base: str, job_id: int) -> dict[str, Any]:
    status, _, body = request(base, "GET", f"/v1/jobs/{job_id}")
    assert status == 200, (job_id, status, body)
    return json.loads(body)["result"]


def enqueue(base: str, spec: dict[str, Any]) -> int:
    status, _, body = request(base, "POST", "/v1/enqueue", {"job": spec})
    assert status == 200, body
    return json.loads(body)["result"]["id"]


def seed_jobs(base: str) -> dict[int, dict[str, Any]]:
    """Jobs in states nothing will move them out of during the test."""
    done = enqueue(base, {"kind": "noop", "tags": ["seed"]})
    failed = enqueue(base, {"kind": "flaky", "args": {"fatal": True}, "tags": ["seed"]})
    later = enqueue(base, {"kind": "noop", "delay_s": 3600, "tags": ["seed"]})
    cancelled = enqueue(base, {"kind": "sleep", "delay_s": 3600, "tags": ["seed"]})
    status, _, body = request(base, "POST", "/v1/cancel", {"job_id": cancelled})
    assert status == 200, body
    expected = {done: "completed", failed: "failed", later: "scheduled", cancelled: "cancelled"}
    wait_for(lambda: all(job_view(base, i)["state"] == s for i, s in expected.items()),
             "the seeded jobs to settle")
    return {i: job_view(base, i) for i in expected}


def guard(name: str, seeded: set[int], queues: set[str]):
    """What makes a generated case safe for the seeded jobs: a map, then a filter."""

    def force_dry_run(case):
        # A dry_run that negative mode made a non-boolean is left alone: the server
        # must refuse the request, and schemathesis checks that it does (overwriting
        # it with true made a valid request schemathesis still believed invalid).
        if isinstance(case.body, dict) and (
                "dry_run" not in case.body or type(case.body["dry_run"]) is bool):
            case.body["dry_run"] = True
        return case

    def safe(case) -> bool:
        body = case.body if isinstance(case.body, dict) else {}
        # `==`, not `in`: negative cases put unhashable values anywhere, and 1.0 == 1.
        if name == "cancel":
            return not any(body.get("job_id") == i for i in seeded)
        if name == "pause":
            return not any(body.get("queue") == q for q in queues)
        if name in BULK:
            # A body that is not an object is rejected before anything runs.
            # Safe: a dry run, or a dry_run that is not a boolean (refused before anything runs).
            return (not isinstance(case.body, dict) or body.get("dry_run") is True
                    or (type(body.get("dry_run")) is not bool and "dry_run" in body))
        return True

    return (force_dry_run if name in BULK else (lambda case: case)), safe


def fuzz_operation(operation, name: str, mode: GenerationMode, base: str, seeded: set[int],
                   calls: dict[str, int], statuses: dict[int, int]) -> None:
    """Up to MAX_EXAMPLES generated cases against the live server, each one checked."""
    fix, safe = guard(name, seeded, set(QUEUES))
    positive = mode == GenerationMode.POSITIVE

    @settings(max_examples=MAX_EXAMPLES if positive else MAX_NEGATIVE_EXAMPLES, deadline=None,
              database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode).map(fix).filter(safe))
    def fuzz(case) -> None:
        response = case.call(base_url=base, headers=AUTH, timeout=10)
        calls[mode.value] = calls.get(mode.value, 0) + 1
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if not positive and response.status_code == 413:
            # Refused for its size (a generated list over maxItems can pass 2 MB) before
            # its shape was read: schemathesis' list of refusals lacks 413, jobd's does not.
            assert response.json()["code"] == "frame_too_long", response.text[:300]
            return
        case.validate_response(response, checks=CHECKS if positive else NEGATIVE_CHECKS,
                               headers=AUTH)

    fuzz()


@pytest.fixture
def daemon(jobd, tmp_path):
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    proc = jobd(control={"http": f"127.0.0.1:{port}", "token_file": str(token_file)},
                queues=QUEUES)
    proc.base = f"http://127.0.0.1:{port}"
    return proc


def test_schemathesis_fuzz_leaves_daemon_and_jobs_intact(daemon):
    base = daemon.base
    started = time.monotonic()
    seeded = seed_jobs(base)

    schema = schemathesis.openapi.from_url(f"{base}/v1/openapi.json", headers=AUTH, timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    names = {op.definition.raw.get("operationId", op.path) for op in operations}
    assert {"enqueue", "get_job", "list", "cancel_many"} <= names, names

    calls: dict[str, int] = {}
    statuses: dict[int, int] = {}
    failures: list[str] = []
    for operation in operations:
        name = operation.definition.raw.get("operationId", operation.path)
        if name in NOT_FUZZED:
            continue
        raw = operation.definition.raw
        # Without a body or parameters there is nothing to get wrong (/metrics, /healthz).
        modes = [GenerationMode.POSITIVE]
        if "requestBody" in raw or "parameters" in raw:
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            try:
                fuzz_operation(operation, name, mode, base, set(seeded), calls, statuses)
            except (Exception, BaseExceptionGroup) as exc:  # report every operation at the end
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}):"
                                f" {exc}")
    fuzz_s = time.monotonic() - started
    assert not failures, "\n\n".join(failures)

    # The daemon is healthy and ready, and nothing it held was touched.
    assert request(base, "GET", "/healthz", token=None)[0] == 200
    assert request(base, "GET", "/readyz", token=None)[0] == 200
    for job_id, before in seeded.items():
        assert job_view(base, job_id) == before, f"seeded job {job_id} changed"
    # It still works: a new job (on a queue the fuzzing did not fill) completes.
    job_id = enqueue(base, {"kind": "noop", "queue": "final"})
    wait_for(lambda: job_view(base, job_id)["state"] == "completed", "a new job to complete")
    assert daemon.proc is not None and daemon.proc.poll() is None
    print(f"schemathesis {schemathesis.__version__}: {calls} cases over {len(operations)}"
          f" operations ({len(NOT_FUZZED)} skipped) in {fuzz_s:.1f}s;"
          f" statuses {dict(sorted(statuses.items()))}")
