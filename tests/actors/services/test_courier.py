"""The courier's policy, pure: what an attempt's answer means for its row (deliver,
retry when, fail), backoff with jitter, Retry-After, and keys that never print."""

from __future__ import annotations

import random

from actors.ports import Delivery
from actors.services.courier import Subscription, backoff, decide, reason, retry_after
from actors.services.outbound import Response

SUB = Subscription.signed_with(["s3cret"], name="w", url="https://h.example/x?token=t0k",
                               backoff_s=2.0, max_backoff_s=60.0, retry_for_s=3600.0)


def row(attempts: int = 1, age_s: float = 0.0) -> Delivery:
    return Delivery(id=7, webhook="w", event="completed", job_id=1, payload="{}",
                    attempts=attempts, age_s=age_s)


def answer(status: int, **headers: str) -> Response:
    return Response(status=status, headers=headers, body=b"")


def test_a_2xx_delivers_anything_else_retries() -> None:
    rng = random.Random(1)
    assert decide(SUB, row(), 0.1, answer(204), None, rng).state == "delivered"
    for status in (301, 400, 404, 410, 500, 503):
        out = decide(SUB, row(), 0.1, answer(status), None, rng)
        assert (out.state, out.status, out.error) == ("pending", status, f"HTTP {status}")
    out = decide(SUB, row(), 10.0, None, "timeout: no answer within 10 s", rng)
    assert (out.state, out.status) == ("pending", None) and reason(out) == "timeout"
    assert reason(decide(SUB, row(), 0.1, None, "ConnectError: refused", rng)) == "network"
    assert reason(decide(SUB, row(), 0.1, answer(502), None, rng)) == "status_5xx"


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    rng = random.Random(2)
    for attempts, base in ((1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0), (10_000, 60.0)):
        delay = backoff(SUB, attempts, rng)
        assert base * 0.75 <= delay <= base * 1.25


def test_the_window_ends_in_a_last_attempt_then_failed() -> None:
    rng = random.Random(3)
    near = decide(SUB, row(attempts=20, age_s=3590.0), 1.0, answer(500), None, rng)
    assert near.state == "pending" and near.delay_s <= 9.0  # moved up to the window's end
    assert decide(SUB, row(attempts=21, age_s=3600.0), 1.0, answer(500), None,
                  rng).state == "failed"


def test_retry_after_is_honoured_for_429_and_503_only_and_capped() -> None:
    assert retry_after(answer(429, **{"retry-after": "30"})) == 30.0
    assert retry_after(answer(503, **{"retry-after": "nonsense"})) is None
    assert retry_after(answer(500, **{"retry-after": "30"})) is None
    out = decide(SUB, row(), 0.1, answer(429, **{"retry-after": "86400"}), None, random.Random())
    assert out.delay_s == 60.0


def test_keys_and_url_never_print() -> None:
    text = repr(SUB) + str(SUB)
    assert "s3cret" not in text and "t0k" not in text and "name='w'" in text
    assert SUB.declared() == {"name": "w", "events": ["completed", "failed", "cancelled"],
                              "kinds": [], "queues": []}
