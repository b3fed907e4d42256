"""Standard Webhooks signing: the spec's own example, rotation, staleness, tampering."""

from __future__ import annotations

import pytest

from protocol.webhook_signing import InvalidSignature, secret_key, sign_headers, verify

# The example from the Standard Webhooks specification.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_specifications_example_signs_and_verifies() -> None:
    headers = sign_headers([secret_key(SPEC_SECRET)], SPEC_ID, SPEC_BODY, now=SPEC_TS)
    assert headers == {"webhook-id": SPEC_ID, "webhook-timestamp": str(SPEC_TS),
                       "webhook-signature": SPEC_SIGNATURE}
    verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS + 10)


def test_rotation_any_listed_signature_verifies() -> None:
    headers = sign_headers([b"old", secret_key(SPEC_SECRET)], "m1", b"{}", now=100)
    verify(SPEC_SECRET, headers, b"{}", now=100)
    verify("old", headers, b"{}", now=100)


@pytest.mark.parametrize("change", ["body", "id", "stale", "future", "secret", "missing",
                                    "timestamp"])
def test_tampering_and_replays_are_refused(change: str) -> None:
    headers = sign_headers([b"s3cret"], "m1", b'{"a":1}', now=1000)
    body, now, secret = b'{"a":1}', 1000.0, "s3cret"
    if change == "body":
        body = b'{"a":2}'
    elif change == "id":
        headers["webhook-id"] = "m2"
    elif change == "stale":
        now = 1000 + 301
    elif change == "future":
        now = 1000 - 301
    elif change == "secret":
        secret = "other"
    elif change == "missing":
        del headers["webhook-signature"]
    elif change == "timestamp":
        headers["webhook-timestamp"] = "12ab"
    with pytest.raises(InvalidSignature):
        verify(secret, headers, body, now=now)


def test_bad_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="base64"):
        secret_key("whsec_***")
    with pytest.raises(ValueError, match="empty"):
        secret_key("")
