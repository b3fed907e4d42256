"""Every way of creating a job builds the same row (issue 15): an enqueue over the socket,
a handler's `ctx.enqueue`, a workflow's `ctx.spawn` and a schedule's fire all take the
handler's declaration for what they leave unset, its key and its cost included.

The SQL `jobd.enqueue` function cannot see handlers: it stores what its caller passes
and the column defaults for the rest (cost 1 among them), so its row matches once the
caller passes the declared values, except for the cost, which it has no parameter for.
"""

from __future__ import annotations

import json
from typing import Any

from tests.support import wait_until

ARGS = '{"shop": "acme", "tokens": 5}'
SCHEDULE = """
[[schedules]]
name = "charge"
kind = "builder.charge"
every = "1s"
missed = "skip"
args = { shop = "acme", tokens = 5 }
"""
# What the declaration gives every row (tests/e2e/builder_handlers.py).
DECLARED = {"kind": "builder.charge", "args": {"shop": "acme", "tokens": 5}, "queue": "builder",
            "key": "shop:acme", "priority": 3, "max_attempts": 7, "timeout_s": 90.0, "cost": 5}
COLUMNS = "id, kind, args, queue, key, priority, max_attempts, timeout_s, cost, tags, unique_key"


def row(sql, where: str, *args: Any) -> dict[str, Any] | None:
    found = sql.fetch(f"SELECT {COLUMNS} FROM jobd.jobs WHERE {where} ORDER BY id LIMIT 1", *args)
    return dict(found[0]) if found else None


def shape(r: dict[str, Any]) -> dict[str, Any]:
    args = r["args"] if isinstance(r["args"], dict) else json.loads(r["args"])
    return {**{k: r[k] for k in DECLARED}, "args": args}


def test_socket_enqueue_spawn_ctx_enqueue_and_a_schedule_fire_build_the_same_row(jobd, sql):
    daemon = jobd(modules=["tests.e2e.builder_handlers"], extra_toml=SCHEDULE)
    by_socket = int(daemon.jobctl("enqueue", "builder.charge", "--args", ARGS).stdout)
    parent_id = int(daemon.jobctl("enqueue", "builder.parent", "--args", ARGS).stdout)
    by_sql = sql.fetchval(
        "SELECT jobd.enqueue('builder.charge', $1::jsonb, queue => 'builder', "
        "key => 'shop:acme', priority => 3::smallint, max_attempts => 7, timeout_s => 90)", ARGS)

    parent = wait_until(lambda: row(sql, "id = $1 AND state IN ('completed', 'failed')",
                                    parent_id), "the parent to finish", daemons=(daemon,))
    done = sql.fetch("SELECT state, result, errors FROM jobd.jobs WHERE id = $1", parent["id"])[0]
    assert done["state"] == "completed", done["errors"]
    children = json.loads(done["result"])
    fired = wait_until(lambda: row(sql, "'schedule:charge' = ANY(tags)"), "a schedule fire",
                       daemons=(daemon,))

    rows = {
        "socket": row(sql, "id = $1", by_socket),
        "spawn": row(sql, "id = $1", children["spawned"]),
        "ctx.enqueue": row(sql, "id = $1", children["enqueued"]),
        "schedule": fired,
    }
    for path, r in rows.items():
        assert r is not None, path
        assert shape(r) == DECLARED, path
    # What differs by design: a schedule's job is keyed and tagged by its occurrence.
    assert fired["unique_key"].startswith("schedule:charge:")
    assert fired["tags"][0] == "schedule:charge" and fired["tags"][1].startswith("fire:")
    assert [rows[p]["tags"] for p in ("socket", "spawn", "ctx.enqueue")] == [[], [], []]

    sql_row = row(sql, "id = $1", by_sql)
    assert sql_row is not None
    assert shape(sql_row) == {**DECLARED, "cost": 1}  # jobd.enqueue takes no cost
