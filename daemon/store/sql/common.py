"""What several subjects' statements share: the unfinished states, the id sequence, the
one way a batch of new jobs travels (a JSON array of actors.ports.NewJob), and the one
way a list view tells a large value."""

from __future__ import annotations

import msgspec

from actors.ports import NewJob

UNFINISHED = "('scheduled', 'available', 'running', 'waiting')"

# A constant sequence name: pg_get_serial_sequence() here would look the catalog up
# once per row, which cost more than the insert itself.
NEXT_JOB_ID = "nextval('jobd.jobs_id_seq'::regclass)"


# The rows to enqueue travel as one JSON array of actors.ports.NewJob, encoded by msgspec
# in one call: eleven parameter arrays cost asyncpg a Python-level type check per
# element, more than Postgres spends parsing the JSON. `args` arrives as JSON text.
def job_rows(param: str) -> str:
    """FROM-clause item: the NewJob JSON array in parameter `param`, one row each, numbered."""
    return f"""
ROWS FROM (json_to_recordset({param}::json) AS (queue text, kind text, args text, key text,
           unique_key text, priority int, delay_s float8, max_attempts int, tags text[],
           timeout_s float8, cost int, traceparent text))
    WITH ORDINALITY AS x(queue, kind, args, key, unique_key, priority, delay_s, max_attempts,
                         tags, timeout_s, cost, traceparent, ord)
"""


def job_rows_json(jobs: list[NewJob]) -> str:
    """The parameter for job_rows(): NewJob's fields by name, args as JSON text."""
    return msgspec.json.encode(jobs).decode()


# For statements that look rows up by the ids they are given. Statistics gathered while
# nothing runs (a backlog just enqueued) say almost no row is 'running', so with the
# literal the generic plan walks the partial index of running rows and tests it against
# every input row: quadratic, seconds per finish batch. A sub-select is a parameter to
# the planner: no partial index matches it and its estimate is ordinary, so the input
# rows drive primary-key probes.
RUNNING = "(SELECT 'running')"


def over(value: str, limit: str) -> str:
    """SQL: whether `value` (jsonb or text) is larger than `limit` bytes as JSON text; the
    stored size is checked first, so a large value is not even detoasted unless it
    compresses below the limit. NULL is not over."""
    return (f"CASE WHEN {value} IS NULL THEN false WHEN pg_column_size({value}) > {limit} "
            f"THEN true ELSE octet_length({value}::text) > {limit} END")


def job_sizes(t: str, limit: str) -> str:
    """LATERAL item `big`: which of job row `t`'s args, result, errors and progress_note
    are over `limit` bytes (list views leave those out, naming them in `truncated`)."""
    return f"""LATERAL (SELECT {over(f"{t}.args", limit)} AS args,
    {over(f"{t}.result", limit)} AS result, {over(f"{t}.errors", limit)} AS errors,
    coalesce(octet_length({t}.progress_note) > {limit}, false) AS note) big"""
