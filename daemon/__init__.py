"""The process: the `jobd` and `jobctl` entry points, the composition root (`app`) and the
modules it wires (`lifecycle`, `reload`, `signals`, `readiness`, `queue_settings`,
`serve_http`), config, the store (all SQL), the control surfaces (`api`), metrics,
systemd notify, logs, the embedded Postgres. No scheduling or retry policy lives here."""

__version__ = "0.1.0"
