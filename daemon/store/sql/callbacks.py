"""An HTTP handler's callbacks (`POST /v1/jobs/{id}/complete` and kin): what the
control plane reads to check a callback token, and the renewal a progress or heartbeat
callback writes. Completing or failing goes through FINISH_MANY, fenced like any finish.
"""

from __future__ import annotations

from daemon.store.sql.common import RUNNING

# $1 = job id.
CALLBACK_TARGET = """
SELECT id, kind, queue, key, state, attempt, max_attempts, lease_token,
       lease_owner IS NULL AND state = 'running' AS detached, lease_until,
       extract(epoch FROM now() - started_at)::float8 AS running_s
FROM jobd.jobs WHERE id = $1
"""

# Progress and liveness from the app, fenced by the attempt's lease token. A detached
# attempt's deadline moves to now + $5 s; one still attached (the 202 not yet read) keeps
# the lease its daemon renews.
# $1 = job id, $2 = lease token, $3 = percentage (NULL: keep), $4 = note (NULL: keep),
# $5 = the kind's callback_timeout (s).
CALLBACK_RENEW = f"""
UPDATE jobd.jobs SET
    progress = coalesce($3::real, progress), progress_note = coalesce($4::text, progress_note),
    lease_until = CASE WHEN lease_owner IS NULL THEN now() + $5 * interval '1 second'
                       ELSE lease_until END
WHERE id = $1 AND lease_token = $2 AND state = {RUNNING}
RETURNING lease_until, lease_owner IS NULL AS detached
"""
