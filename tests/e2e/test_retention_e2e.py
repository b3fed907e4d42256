"""Retention never takes what a live workflow still needs: a fan-in parent's finished
children outlive the count and age limits while the parent is unfinished."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.support import wait_until


def test_fan_in_survives_default_style_retention(jobd, sql, tmp_path: Path):
    go = tmp_path / "go"
    # The default keeps the newest 1,000 completed; 5 shows the same with 30 jobs.
    daemon = jobd(modules=["examples.basic", "tests.e2e.retention_handlers"],
                  jobs={"reaper_interval": "0.2s"}, env={"FANIN_GO_FILE": str(go)},
                  extra_toml="[jobs.retention]\ncompleted_max_count = 5\n")
    parent = int(daemon.jobctl("enqueue", "fanin.parent").stdout)

    def children_done() -> bool:
        rows = sql.fetch("SELECT state FROM jobd.jobs WHERE parent_id = $1", parent)
        return len(rows) == 3 and all(r["state"] == "completed" for r in rows)

    wait_until(children_done, "the three children to complete", daemons=(daemon,))
    # Newer completions push the children out of the newest 5, and the reaper prunes.
    sql.execute("SELECT jobd.enqueue('noop', '{}'::jsonb) FROM generate_series(1, 30)")
    # (Jobs finished in one batch share finished_at, so the cut may take all of them.)
    wait_until(lambda: sql.fetchval(
        "SELECT count(*) FILTER (WHERE state <> 'completed') = 0 AND count(*) <= 5"
        " FROM jobd.jobs WHERE kind = 'noop'"),
        "retention to prune the noops down to 5", daemons=(daemon,))
    assert sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE parent_id = $1", parent) == 3

    go.write_text("1")
    wait_until(lambda: sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", parent)
               in ("completed", "failed"), "the parent to finish", daemons=(daemon,))
    row = sql.fetch("SELECT state, result::text, errors::text FROM jobd.jobs WHERE id = $1",
                    parent)[0]
    assert row["state"] == "completed", row
    assert row["result"] == '{"sum": 6}', row
    # Finished parent: its children are ordinary finished jobs again and go.
    sql.execute("SELECT jobd.enqueue('noop', '{}'::jsonb) FROM generate_series(1, 10)")
    wait_until(lambda: sql.fetchval(
        "SELECT count(*) FROM jobd.jobs WHERE parent_id = $1", parent) == 0,
        "the children to be pruned after the parent finished", daemons=(daemon,))


def test_two_daemons_pruning_at_once_take_each_workflows_steps_with_it(jobd, sql,
                                                                       tmp_path: Path):
    """Steps go with their job by a trigger on jobd.jobs (no foreign key): two daemons'
    reapers pruning the same finished workflows at once leave no step without its job,
    and the steps of the workflows retention keeps stay whole."""
    options = {"modules": ["examples.basic", "tests.e2e.workflow_handlers"],
               "queues": {"wf": {"concurrency": 20}},
               "jobs": {"reaper_interval": "0.2s"},
               "extra_toml": "[jobs.retention]\ncompleted_max_count = 10\n"}
    a, b = jobd(**options), jobd(**options)
    args = {"acks": str(tmp_path / "acks"), "steps": 5}

    def wave(n: int) -> None:
        sql.execute("INSERT INTO jobd.jobs (kind, queue, args) SELECT 'wf.acked', 'wf',"
                    " $1::jsonb FROM generate_series(1, $2)", json.dumps(args), n)
        wait_until(lambda: sql.fetchval(
            "SELECT count(*) FROM jobd.jobs WHERE state <> 'completed'") == 0,
            "the workflows to complete", daemons=(a, b))

    for _ in range(4):  # waves, so that both reapers have batches to race for
        wave(30)
    wait_until(lambda: sql.fetchval("SELECT count(*) FROM jobd.jobs") <= 10,
               "retention to prune down to 10", daemons=(a, b))
    # (Jobs finished in one batch share finished_at, so the cut may take all of them.)
    # A last wave within the limit stays, with its steps, across a few more passes.
    kept_before = {r["id"] for r in sql.fetch("SELECT id FROM jobd.jobs")}
    wave(10 - len(kept_before))
    time.sleep(1.0)  # five reaper passes on each daemon
    orphans = sql.fetchval("SELECT count(*) FROM jobd.job_steps s WHERE NOT EXISTS"
                           " (SELECT 1 FROM jobd.jobs j WHERE j.id = s.job_id)")
    assert orphans == 0
    kept = sql.fetch("SELECT j.id, count(s.name) AS n FROM jobd.jobs j"
                     " LEFT JOIN jobd.job_steps s ON s.job_id = j.id GROUP BY j.id")
    assert len(kept) == 10 and all(r["n"] == 5 for r in kept), kept
    assert a.proc.poll() is None and b.proc.poll() is None
