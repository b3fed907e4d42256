"""The actor runtime: mailboxes, supervisors, the registry, the clock, the loop-lag probe.

Nothing here knows about jobs; the services are built from it."""
