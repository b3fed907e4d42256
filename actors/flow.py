"""One queue's flow limits as they travel from the config to the claim: the limits every
key gets, named keys' overrides and the queue-wide rate. The daemon derives them from
`[queues.<name>]`; the dispatcher hands them to `Store.claim`, which sends them to
`jobd.claim_flow` as JSON whose keys are these field names.

A limit that is not set is left out of that JSON, never sent as null: the SQL lays a
key's overrides over the defaults with `||` and tests whether a limit is set with `?|`,
so a null would erase a default and count as a limit.
"""

from __future__ import annotations

import msgspec

# How long an open breaker stays open when the queue names no cooldown (the SQL's too).
BREAKER_COOLDOWN_S = 30.0


class KeyLimits(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """The limits on one key's jobs; None: not limited that way."""

    concurrency: int | None = None  # running at once, across every daemon
    rate: float | None = None  # starts per second (a token bucket)
    burst: float | None = None  # that bucket's size
    tpm: float | None = None  # job cost per minute
    adaptive: bool | None = None  # a rate limit slows `rate`, successes bring it back
    breaker_failures: int | None = None  # consecutive failures that open the breaker
    breaker_cooldown_s: float | None = None  # how long it stays open


class FlowLimits(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True,
                 kw_only=True):
    """A queue under flow control; a queue without limits has None instead."""

    default: KeyLimits  # what every key gets
    keys: dict[str, KeyLimits]  # named keys' overrides, laid over `default`
    # How long a rate limit that does not say (a 429 without Retry-After) pauses its
    # key; None pauses nothing (the config always sets it: queues.<name>.rate_limit_pause).
    rate_limit_pause_s: float | None = None
    queue_rate: float | None = None  # starts per second across the whole queue
    queue_burst: float | None = None

    def for_key(self, key: str) -> KeyLimits:
        """One key's limits: the defaults with that key's overrides on top."""
        over = self.keys.get(key)
        if over is None:
            return self.default
        changes = {name: value for name in over.__struct_fields__
                   if (value := getattr(over, name)) is not None}
        return msgspec.structs.replace(self.default, **changes)
