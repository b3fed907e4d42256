"""Every SQL statement jobd runs, by name, one module per subject: `jobs` (a job's life),
`leases` (daemons and their leases), `flow` (per-key flow control), `control` (filters,
bulk operations, pauses), `runs` (the dashboard's run detail and activity), `schedules`,
`workflows`, `metrics` (the gauge leader), and `callbacks` (an HTTP handler's
callbacks), `common` (what several share). Each statement's parameters are listed above it.

Time-sensitive statements read `coalesce($n::timestamptz, now())`: production passes
NULL so all daemons share the database's clock; tests pass a pinned time.
JSON travels as text and is cast in SQL, so msgspec does all encoding on our side.
"""
