"""actors.flow: a key's limits laid over the queue's, and the JSON jobd.claim_flow reads."""

from __future__ import annotations

import msgspec
import pytest

from actors.flow import FlowLimits, KeyLimits

LIMITS = FlowLimits(
    default=KeyLimits(concurrency=3, rate=2.0, breaker_failures=5, breaker_cooldown_s=10.0),
    keys={"slow": KeyLimits(concurrency=1, adaptive=False), "open": KeyLimits()},
    rate_limit_pause_s=30.0,
)


def test_a_key_gets_the_defaults_with_its_overrides_on_top() -> None:
    assert LIMITS.for_key("slow") == KeyLimits(concurrency=1, rate=2.0, adaptive=False,
                                               breaker_failures=5, breaker_cooldown_s=10.0)
    assert LIMITS.for_key("open") == LIMITS.default  # an empty override changes nothing
    assert LIMITS.for_key("anyone") is LIMITS.default
    assert LIMITS.for_key("slow").breaker_failures == 5


def test_unset_limits_are_left_out_of_the_json_not_sent_as_null() -> None:
    """The SQL merges with `||` and tests with `?|`: a null would erase a default."""
    assert msgspec.json.decode(msgspec.json.encode(LIMITS)) == {
        "default": {"concurrency": 3, "rate": 2.0, "breaker_failures": 5,
                    "breaker_cooldown_s": 10.0},
        "keys": {"slow": {"concurrency": 1, "adaptive": False}, "open": {}},
        "rate_limit_pause_s": 30.0,
    }
    queue_wide = FlowLimits(default=KeyLimits(), keys={}, rate_limit_pause_s=1.5,
                            queue_rate=0.5, queue_burst=2.0)
    assert msgspec.json.decode(msgspec.json.encode(queue_wide)) == {
        "default": {}, "keys": {}, "rate_limit_pause_s": 1.5, "queue_rate": 0.5,
        "queue_burst": 2.0}


def test_the_json_decodes_back_and_refuses_unknown_limits() -> None:
    encoded = msgspec.json.encode(LIMITS)
    assert msgspec.json.decode(encoded, type=FlowLimits) == LIMITS
    with pytest.raises(msgspec.ValidationError, match="max_keys"):
        msgspec.convert({"default": {}, "keys": {}, "rate_limit_pause_s": 1, "max_keys": 5},
                        FlowLimits)
