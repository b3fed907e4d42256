"""Retention never takes what a live workflow still needs: a fan-in parent's finished
children outlive the count and age limits while the parent is unfinished."""

from __future__ import annotations

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
