"""The classification table and backoff in actors.retry: pure functions, no I/O."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors import retry
from actors.errors import Fail, RateLimited, RetryAfter
from actors.services.outcomes import remote_signal

# --------------------------------------------------------------------------- fakes


class FakeResponse:
    def __init__(self, status_code: int, headers: dict[str, str] | None = None):
        self.status_code = status_code
        self.headers = headers or {}


class FakeHTTPStatusError(Exception):
    """Shaped like httpx.HTTPStatusError: the status lives on `.response`."""

    def __init__(self, status_code: int, headers: dict[str, str] | None = None):
        super().__init__(f"HTTP {status_code}")
        self.response = FakeResponse(status_code, headers)


class TransportError(Exception):
    """Named like httpx.TransportError; matched by name, not by import."""


def rng() -> random.Random:
    return random.Random(1234)


# --------------------------------------------------------------------------- classes


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (FakeHTTPStatusError(429), "rate_limit"),
        (FakeHTTPStatusError(429, {"Retry-After": "7"}), "rate_limit"),
        (FakeHTTPStatusError(400), "client"),
        (FakeHTTPStatusError(401), "client"),
        (FakeHTTPStatusError(403), "client"),
        (FakeHTTPStatusError(500), "network"),
        (FakeHTTPStatusError(503), "network"),
        (TimeoutError("slow"), "network"),
        (ConnectionRefusedError("refused"), "network"),
        (ConnectionResetError("reset"), "network"),
        (TransportError("boom"), "network"),
        (msgspec.ValidationError("Expected `int`, got `str` - at `$.n`"), "validation"),
        (Fail("nope"), "fail"),
        (RetryAfter(12), "snooze"),
        (RuntimeError("who knows"), "unknown"),
        (FakeHTTPStatusError(404), "unknown"),
    ],
)
def test_error_class(exc: BaseException, expected: str):
    assert retry.error_class(exc) == expected


def test_status_on_the_exception_itself_counts_too():
    exc = RuntimeError("aiohttp-like")
    exc.status = 403  # type: ignore[attr-defined]
    assert retry.error_class(exc) == "client"


def test_429_honours_retry_after_header():
    exc = FakeHTTPStatusError(429, {"Retry-After": "7"})
    assert retry.decide(exc, 1, 5, rng()) == retry.Decision("retry", "rate_limit", 7.0, 7.0)


def test_429_lowercase_header_is_found():
    exc = FakeHTTPStatusError(429, {"retry-after": "2.5"})
    assert retry.decide(exc, 3, 5, rng()).delay_s == 2.5


def test_429_without_header_backs_off_from_60s():
    decision = retry.decide(FakeHTTPStatusError(429), 1, 5, rng())
    assert (decision.action, decision.error_class) == ("retry", "rate_limit")
    assert 45.0 <= decision.delay_s <= 75.0


def test_429_with_http_date_header_falls_back_to_backoff():
    exc = FakeHTTPStatusError(429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    decision = retry.decide(exc, 1, 5, rng())
    assert decision.action == "retry"
    assert 45.0 <= decision.delay_s <= 75.0


@pytest.mark.parametrize("status", [400, 401, 403])
def test_client_errors_fail_now(status: int):
    decision = retry.decide(FakeHTTPStatusError(status), 1, 10, rng())
    assert decision == retry.Decision("fail", "client")


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (Fail("told to"), "fail"),
        (msgspec.ValidationError("bad"), "validation"),
    ],
)
def test_fail_now_classes_ignore_remaining_attempts(exc: BaseException, cls: str):
    assert retry.decide(exc, 1, 10, rng()) == retry.Decision("fail", cls)


@pytest.mark.parametrize(
    ("exc", "cls", "base"),
    [
        (FakeHTTPStatusError(502), "network", 10.0),
        (TimeoutError(), "network", 10.0),
        (ConnectionRefusedError(), "network", 10.0),
        (RuntimeError("x"), "unknown", 5.0),
    ],
)
def test_retryable_classes_back_off_from_their_base(exc: BaseException, cls: str, base: float):
    decision = retry.decide(exc, 2, 5, rng())
    assert (decision.action, decision.error_class) == ("retry", cls)
    assert 0.75 * base * 2 <= decision.delay_s <= 1.25 * base * 2


def test_retry_after_snoozes_whatever_the_attempt():
    assert retry.decide(RetryAfter(30), 1, 3, rng()) == retry.Decision("snooze", "snooze", 30.0)
    assert retry.decide(RetryAfter(30), 3, 3, rng()) == retry.Decision("snooze", "snooze", 30.0)
    assert RetryAfter(-5).seconds == 0.0


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("x"), TimeoutError(), FakeHTTPStatusError(500),
     FakeHTTPStatusError(429, {"Retry-After": "1"}), FakeHTTPStatusError(429)],
)
def test_fail_when_attempts_are_exhausted(exc: BaseException):
    decision = retry.decide(exc, 3, 3, rng())
    assert decision.action == "fail"
    assert decision.error_class == retry.error_class(exc)


def test_per_kind_base_delays_override_the_defaults():
    decision = retry.decide(RuntimeError(), 1, 3, rng(), {"unknown": 0.05})
    assert 0.0375 <= decision.delay_s <= 0.0625


def test_timeout_decision():
    decision = retry.timeout_decision(1, 3, rng())
    assert (decision.action, decision.error_class) == ("retry", "timeout")
    assert 7.5 <= decision.delay_s <= 12.5
    assert retry.timeout_decision(3, 3, rng()) == retry.Decision("fail", "timeout")


# --------------------------------------------------------------------------- backoff


def test_backoff_grows_exponentially_until_the_cap():
    fixed = random.Random(0)
    fixed.uniform = lambda a, b: 1.0  # type: ignore[method-assign]
    delays = [retry.backoff("network", n, fixed) for n in range(1, 12)]
    assert delays[:4] == [10.0, 20.0, 40.0, 80.0]
    assert delays[-1] == retry.MAX_DELAY_S
    assert delays == sorted(delays)


@given(
    attempt=st.integers(min_value=0, max_value=100_000),
    base=st.one_of(st.just(0.0), st.floats(min_value=0.001, max_value=10_000.0)),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_backoff_stays_within_jitter_bounds(attempt: int, base: float, seed: int):
    delay = retry.backoff("unknown", attempt, random.Random(seed), {"unknown": base})
    n = max(attempt - 1, 0)
    # base * 2^n, evaluated without float overflow: past 2^64 any base here exceeds the cap.
    nominal = min(base * 2.0**n if n <= 64 else (retry.MAX_DELAY_S if base else 0.0),
                  retry.MAX_DELAY_S)
    assert 0.75 * nominal - 1e-9 <= delay <= 1.25 * nominal + 1e-9


@given(attempt=st.integers(min_value=1, max_value=10_000),
       seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_decide_never_crashes_on_large_attempt_numbers(attempt: int, seed: int):
    decision = retry.decide(RuntimeError(), attempt, attempt + 1, random.Random(seed))
    assert decision.action == "retry"
    assert decision.delay_s <= 1.25 * retry.MAX_DELAY_S


def test_summarize_keeps_type_message_and_frames():
    try:
        raise ValueError("x" * 5000)
    except ValueError as exc:
        summary = retry.summarize(exc)
    assert summary["type"] == "ValueError"
    assert len(summary["message"]) == 2000
    assert "test_summarize_keeps_type_message_and_frames" in summary["traceback"]


# --------------------------------------------------------------------------- the key's signal
# (issue 14, item 8) A snooze is this job's business; a rate limit is the key's.


def signal(exc: BaseException, attempt: int = 1, max_attempts: int = 5):
    return remote_signal(retry.decide(exc, attempt, max_attempts, rng()))


def test_a_snooze_says_nothing_about_the_key():
    assert signal(RetryAfter(30, "come back later")) == (None, None)


def test_a_429_with_retry_after_pauses_the_key_that_long():
    assert signal(FakeHTTPStatusError(429, {"Retry-After": "7"})) == ("rate_limited", 7.0)


def test_a_429_without_retry_after_leaves_the_pause_to_the_queue_default():
    # Not the job's own backoff (60 s, doubling up to an hour): the claim's configured
    # rate_limit_pause applies to the key; the job still backs off on its own.
    decision = retry.decide(FakeHTTPStatusError(429), 4, 10, rng())
    assert decision.delay_s > 300 and decision.pause_s is None
    assert signal(FakeHTTPStatusError(429), attempt=4, max_attempts=10) == ("rate_limited", None)


def test_rate_limited_is_a_rate_limit_with_or_without_seconds():
    assert retry.error_class(RateLimited()) == "rate_limit"
    assert retry.decide(RateLimited(5), 1, 3, rng()) == retry.Decision(
        "retry", "rate_limit", 5.0, 5.0)
    assert signal(RateLimited(5)) == ("rate_limited", 5.0)
    assert signal(RateLimited()) == ("rate_limited", None)
    assert RateLimited(-1).seconds == 0.0
    # On the last attempt the job fails, and the key still hears about it.
    assert signal(RateLimited(5), attempt=3, max_attempts=3) == ("rate_limited", 5.0)


def test_rate_limited_is_exported_for_handlers():
    import actors

    assert actors.RateLimited is RateLimited
