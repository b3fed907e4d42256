"""tx.complete(result) meets the same checks as a returned result (issue 14, items 2
and 16): a NUL or lone surrogate fails the attempt as invalid_value, a result over
limits.max_result_bytes as result_too_large; the handler's writes in that transaction
roll back with it, and the daemon goes on."""

from __future__ import annotations

import json

import pytest

from tests.e2e.tx_result_handlers import WRITES_TABLE
from tests.support import wait_until

MODULES = ["tests.e2e.tx_result_handlers"]


@pytest.fixture
def daemon(jobd, sql):
    sql.execute(WRITES_TABLE)
    return jobd(modules=MODULES, extra_toml="[limits]\nmax_result_bytes = 4096\n")


def run(daemon, sql, what: str) -> dict:
    job_id = int(daemon.jobctl("enqueue", "tx_result", "--args",
                               json.dumps({"what": what})).stdout)

    def row():
        rows = sql.fetch("SELECT id, state, errors::text AS errors, result::text AS result"
                         " FROM jobd.jobs WHERE id = $1 AND state IN ('completed', 'failed')",
                         job_id)
        return rows[0] if rows else None

    r = wait_until(row, f"job {job_id} to finish", timeout=30, daemons=(daemon,))
    return {"id": job_id, "state": r["state"], "errors": json.loads(r["errors"]),
            "result": json.loads(r["result"]) if r["result"] else None,
            "written": sql.fetchval("SELECT count(*) FROM tx_writes WHERE job_id = $1", job_id)}


@pytest.mark.parametrize("what, error_class, words", [
    ("nul", "invalid_value", "NUL"), ("surrogate", "invalid_value", "surrogate"),
    ("big", "result_too_large", "4096 bytes")])
def test_tx_complete_refuses_what_the_worker_refuses(daemon, sql, what, error_class, words):
    job = run(daemon, sql, what)
    assert (job["state"], job["result"], job["written"]) == ("failed", None, 0)
    [error] = job["errors"]
    assert error["class"] == error_class and words in error["message"], error
    ok = run(daemon, sql, "ok")
    assert (ok["state"], ok["result"], ok["written"]) == ("completed", {"fine": True}, 1)
    assert daemon.jobctl_json("ping")["ready"] is True
