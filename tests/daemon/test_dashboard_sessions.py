"""Dashboard sessions: the signed cookie, its expiry, token rotation, CSRF, origins."""

from __future__ import annotations

from daemon.dashboard.sessions import READ, WRITE, Sessions, same_origin


def sessions(api: str | None = "api-token", read: str | None = "read-token") -> Sessions:
    return Sessions(api_token=api, read_token=read, lifetime_s=3600)


def test_each_token_signs_in_with_its_role_and_nothing_else_does():
    s = sessions()
    assert s.sign_in("api-token", "alice", now=0).role == WRITE
    assert s.sign_in(" read-token\n", "rita", now=0).role == READ
    assert s.sign_in("api-token ", "", now=0).can_act
    assert not s.sign_in("read-token", "", now=0).can_act
    for wrong in ("", "api-toke", "api-token-x", "API-TOKEN", "read-token\0"):
        assert s.sign_in(wrong, "", now=0) is None
    assert not sessions(None, None).enabled
    assert sessions(None, None).sign_in("", "", now=0) is None


def test_cookie_round_trip_tampering_and_expiry():
    s = sessions()
    session = s.sign_in("api-token", "alice", now=1000)
    cookie = s.cookie_value(session)
    assert s.from_cookie(cookie, now=1001) == session
    assert s.from_cookie(cookie, now=1000 + 3600 + 1) is None  # expired
    payload, _, mac = cookie.partition(".")
    assert s.from_cookie(payload + "." + mac[:-1] + ("A" if mac[-1] != "A" else "B"), now=1001) is None
    assert s.from_cookie(payload + "x." + mac, now=1001) is None
    for junk in ("", ".", "x", "a.b.c", "\0", "é.é", "=" * 50):
        assert s.from_cookie(junk, now=1001) is None


def test_rotating_a_token_signs_every_session_out():
    session = sessions().sign_in("read-token", "rita", now=0)
    cookie = sessions().cookie_value(session)
    assert sessions().from_cookie(cookie, now=1) is not None  # any daemon with the tokens
    assert sessions(read="new-read-token").from_cookie(cookie, now=1) is None
    assert sessions(api="new-api-token").from_cookie(cookie, now=1) is None
    # A write session is void once the API token is gone, even with the same key.
    write = sessions(api="api-token", read=None)
    assert write.from_cookie(write.cookie_value(write.sign_in("api-token", "", now=0)), now=1)


def test_csrf_token_is_per_session():
    s = sessions()
    a, b = s.sign_in("api-token", "", now=0), s.sign_in("api-token", "", now=0)
    assert s.csrf_ok(a, s.csrf_token(a))
    assert not s.csrf_ok(a, s.csrf_token(b))
    assert not s.csrf_ok(a, "")
    assert not sessions(api="other").csrf_ok(a, s.csrf_token(a))


def test_same_origin():
    host = {b"host": b"jobd.internal:8080"}
    assert same_origin(host)  # neither header: not a browser page's request
    assert same_origin({**host, b"origin": b"http://jobd.internal:8080"})
    # Behind a proxy that ends TLS: the page is https, jobd sees http.
    assert same_origin({**host, b"origin": b"https://jobd.internal:8080"})
    assert same_origin({b"host": b"127.0.0.1:9464", b"x-forwarded-host": b"jobs.example.com",
                        b"origin": b"https://jobs.example.com"})
    assert not same_origin({**host, b"origin": b"http://evil.example"})
    assert not same_origin({**host, b"origin": b"http://jobd.internal:8080.evil.example"})
    assert not same_origin({**host, b"origin": b"null"})
    assert not same_origin({**host, b"origin": b"file://jobd.internal:8080"})
    assert not same_origin({b"origin": b"http://jobd.internal:8080"})  # no Host at all
    assert same_origin({**host, b"sec-fetch-site": b"same-origin"})
    assert not same_origin({**host, b"sec-fetch-site": b"cross-site"})
    assert not same_origin({**host, b"sec-fetch-site": b"same-site"})
