"""The examples end to end: the real daemon, the example handlers, the stand-in servers
(429 storms, 5xx, a judge that rejects three times, models that are down)."""

from __future__ import annotations

import json

import pytest

from examples.standin_servers import StandinServers
from tests.e2e.test_crash import wait_until

MODULES = ["examples.stock_pipeline", "examples.predictions", "examples.marketplace"]
JOBS = {"lease": "5s", "reaper_interval": "0.5s", "poll_interval": "0.5s",
        "progress_every_items": 5}


@pytest.fixture
def servers():
    with StandinServers() as s:
        yield s


def start(jobd, servers):
    return jobd(modules=MODULES, jobs=JOBS, env={"JOBD_STANDIN_URL": servers.url},
                queues={"models": {"concurrency": 8}, "crawl": {"concurrency": 4}})


def result(sql, job_id):
    state, raw = sql.fetch("SELECT state, result::text AS r FROM jobd.jobs WHERE id = $1",
                           job_id)[0]
    return state, (json.loads(raw) if raw else None)


def finished(sql, job_id) -> bool:
    return sql.fetchval("SELECT state IN ('completed', 'failed', 'cancelled') FROM jobd.jobs"
                        " WHERE id = $1", job_id)


def test_stock_pipeline_with_approval_429_storm_and_judge_rejecting_three_times(
        jobd, sql, servers):
    servers.configure(judge_rejects=3, rate_limit_next=6, retry_after=1)
    daemon = start(jobd, servers)
    args = {"sector": "semiconductors", "tickers": ["NVDA", "AMD", "INTC", "TSM", "ASML", "MU"]}
    job_id = int(daemon.jobctl("enqueue", "stocks.pipeline", "--args", json.dumps(args)).stdout)
    wait_until("waiting for approval", lambda: sql.fetchval(
        "SELECT state = 'waiting' FROM jobd.jobs WHERE id = $1", job_id), daemons=(daemon,))
    human = daemon.jobctl("get", str(job_id)).stdout
    assert "waiting for: event 'subsector.approved'" in human and "research" in human
    daemon.jobctl("send-event", "subsector.approved", "--data",
                  json.dumps({"id": job_id, "by": "ann"}))
    wait_until("pipeline finished", lambda: finished(sql, job_id), daemons=(daemon,))
    state, out = result(sql, job_id)
    assert state == "completed", daemon.jobctl("get", str(job_id)).stdout
    assert out["rounds"] == 4 and out["approved_by"] == "ann"
    assert out["report"].count("\n- ") == 5
    view = daemon.jobctl_json("get", str(job_id))
    assert len(view["children"]) == 5 and all(c["state"] == "completed" for c in view["children"])
    names = [s["name"] for s in view["steps"]]
    assert names[-1] == "format" and "judge:3" in names


def test_predictions_sessions_models_in_turn_and_refund(jobd, sql, servers):
    servers.configure(fail_models=["fast-1"], fail_next=3)
    daemon = start(jobd, servers)
    nightly = int(daemon.jobctl("enqueue", "predict.nightly", "--args", json.dumps(
        {"day": "2025-10-14", "questions": [f"q{i}" for i in range(20)]})).stdout)
    ok = int(daemon.jobctl("enqueue", "predict.session", "--args", json.dumps(
        {"user": "u1", "question": "will it rain?"})).stdout)
    doomed = int(daemon.jobctl("enqueue", "predict.session", "--args", json.dumps(
        {"user": "u2", "question": "?", "models": ["fast-1"], "credits": 3})).stdout)
    for j in (nightly, ok, doomed):
        wait_until(f"job {j} finished", lambda j=j: finished(sql, j), daemons=(daemon,))
    assert result(sql, ok)[0] == "completed"
    assert result(sql, ok)[1]["model"] == "smart-1"  # fast-1 is down: the next model answered
    assert result(sql, doomed)[0] == "failed"
    assert result(sql, nightly)[1] == {"day": "2025-10-14", "done": 20, "failed": 0}
    wait_until("the refund", lambda: servers.state.refunds, daemons=(daemon,))
    [refund] = servers.state.refunds
    assert refund["user"] == "u2" and refund["credits"] == 3


def test_marketplace_refresh_with_429_storm_and_progress(jobd, sql, servers):
    servers.configure(rate_limit_next=10, retry_after=1, fail_next=2)
    daemon = start(jobd, servers)
    ids = [int(daemon.jobctl("enqueue", "market.refresh", "--args",
                             json.dumps({"marketplace": m})).stdout) for m in ("ebay", "etsy")]
    for j in ids:
        wait_until(f"refresh {j}", lambda j=j: finished(sql, j), daemons=(daemon,))
    for j, m in zip(ids, ("ebay", "etsy"), strict=True):
        state, out = result(sql, j)
        assert state == "completed" and out["marketplace"] == m and out["listings"] == 30
    # The same answers as an undisturbed run: the stand-in is deterministic.
    again = int(daemon.jobctl("enqueue", "market.refresh", "--args",
                              json.dumps({"marketplace": "ebay"})).stdout)
    wait_until("rerun", lambda: finished(sql, again), daemons=(daemon,))
    assert result(sql, again)[1] == result(sql, ids[0])[1]
