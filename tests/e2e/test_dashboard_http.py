"""The dashboard of a real `jobd run` over plain HTTP: sign-in, pages, actions, and every
refusal (no session, CSRF, another origin, a read-only session, bad input). The browser
tests (tests/browser/test_dashboard.py) drive the same pages in Chromium."""

from __future__ import annotations

import re
import socket
from typing import Any

import httpx
import pytest

from tests.e2e.test_http_e2e import free_port
from tests.support import JobdProcess, Sql, wait_until

TOKEN = "dash-api-token-0123456789"
READ_TOKEN = "dash-read-token-9876543210"
CSP = "default-src 'self'"


@pytest.fixture
def daemon(jobd, tmp_path, fresh_database):
    (tmp_path / "api-token").write_text(TOKEN + "\n")
    (tmp_path / "read-token").write_text(READ_TOKEN + "\n")
    port = free_port()
    proc = jobd(modules=["tests.e2e.dashboard_handlers"],
                queues={"dash": {"concurrency": 4, "key_concurrency": 2}},
                control={"http": f"127.0.0.1:{port}",
                         "token_file": str(tmp_path / "api-token")},
                extra_toml=f'[dashboard]\nread_token_file = "{tmp_path / "read-token"}"\n'
                           'refresh = "1s"\n')
    proc.base = f"http://127.0.0.1:{port}"
    proc.sql = Sql(fresh_database)
    return proc


def signed_in(base: str, token: str = TOKEN, name: str = "alice") -> httpx.Client:
    client = httpx.Client(base_url=base, follow_redirects=False, timeout=10)
    reply = client.post("/ui/login", data={"token": token, "name": name, "next": "/ui/runs"})
    assert reply.status_code == 303, reply.text
    assert reply.headers["location"] == "/ui/runs"
    return client


def csrf(client: httpx.Client) -> str:
    page = client.get("/ui/").text
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert match, page[:500]
    return match.group(1)


def enqueue(base: str, kind: str, **fields: Any) -> int:
    reply = httpx.post(f"{base}/v1/enqueue", json={"job": {"kind": kind, **fields}},
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()["result"]["id"]


def state(daemon, job_id: int) -> str:
    return daemon.sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", job_id)


def finished(daemon, job_id: int) -> str:
    return wait_until(lambda: state(daemon, job_id) in ("completed", "failed", "cancelled")
                      and state(daemon, job_id), f"job {job_id} to finish")


def test_sign_in_pages_and_headers(daemon):
    base = daemon.base
    anonymous = httpx.Client(base_url=base, follow_redirects=False, timeout=10)
    # No session: every page sends the browser to sign in, remembering where it was.
    reply = anonymous.get("/ui/runs", params={"state": "failed"})
    assert reply.status_code == 303
    assert reply.headers["location"] == "/ui/login?next=/ui/runs%3Fstate%3Dfailed"
    login = anonymous.get("/ui/login")
    assert login.status_code == 200 and 'id="token"' in login.text
    reply = anonymous.post("/ui/login", data={"token": "wrong"})
    assert reply.status_code == 401 and "wrong token" in reply.text
    assert "set-cookie" not in {k.lower() for k in reply.headers if "jobd_session" in
                                reply.headers.get(k, "")}

    ok_id = enqueue(base, "dash.ok", args={"text": "hello"})
    fail_id = enqueue(base, "dash.fail", args={"text": "needle-7f3"})
    flow_id = enqueue(base, "dash.flow", args={"text": "plain"})
    for job_id in (ok_id, fail_id, flow_id):
        finished(daemon, job_id)

    client = signed_in(base)
    cookie = client.cookies.jar
    assert any(c.name == "jobd_session" for c in cookie)
    raw = client.post("/ui/login", data={"token": TOKEN}).headers["set-cookie"]
    assert "HttpOnly" in raw and "SameSite=Strict" in raw and "Path=/ui" in raw

    pages = {"/ui/": 'data-queue="dash"', "/ui/runs": f'data-job-id="{fail_id}"',
             f"/ui/runs/{fail_id}": "needle-7f3", f"/ui/runs/{flow_id}": 'data-step="fetch"',
             "/ui/schedules": 'id="schedules"', "/ui/daemons": 'id="tree"'}
    for path, needle in pages.items():
        reply = client.get(path)
        assert reply.status_code == 200, (path, reply.text[:300])
        assert needle in reply.text, path
        assert reply.headers["content-security-policy"].startswith(CSP)
        assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
        assert reply.headers["x-frame-options"] == "DENY"
        assert reply.headers["cache-control"] == "no-store"
        # No page carries either token, and no script or style is inline (the CSP).
        assert TOKEN not in reply.text and READ_TOKEN not in reply.text
        assert "<script>" not in reply.text and "style=" not in reply.text

    failed = client.get(f"/ui/runs/{fail_id}").text
    assert re.search(r'id="state"[^>]*>failed<', failed)
    assert 'class="traceback"' in failed and "(ValueError) boom 100% needle-7f3" in failed
    workflow = client.get(f"/ui/runs/{flow_id}").text
    assert 'id="children"' in workflow and "dash.child" in workflow

    # Filters narrow the runs page; keyset pages link to the next.
    only_failed = client.get("/ui/runs", params={"state": "failed"}).text
    assert f'data-job-id="{fail_id}"' in only_failed
    assert f'data-job-id="{ok_id}"' not in only_failed
    by_kind = client.get("/ui/runs", params={"kind": "dash.ok"}).text
    assert f'data-job-id="{ok_id}"' in by_kind and f'data-job-id="{fail_id}"' not in by_kind
    by_error = client.get("/ui/runs", params={"error": "NEEDLE-7F3"}).text
    assert f'data-job-id="{fail_id}"' in by_error and f'data-job-id="{ok_id}"' not in by_error
    assert f'data-job-id="{fail_id}"' in client.get("/ui/runs", params={"error": "100% n"}).text
    assert "No job matches" in client.get("/ui/runs", params={"error": "100_ n"}).text
    # The newest page polls; a page filtered by error text (a scan) or an end time does not.
    assert "hx-trigger" in client.get("/ui/runs").text
    for past in ({"error": "boom"}, {"created_before": "2026-01-01T00:00"}):
        assert "hx-trigger" not in client.get("/ui/runs", params=past).text, past
    # The overview counts the last hour's finished jobs; a child links to its parent.
    overview = client.get("/ui/").text
    row = re.search(r'<tr data-queue="dash".*?</tr>', overview, re.S).group(0)
    assert re.search(r'class="num completed"><a[^>]*>3<', row), row  # ok, flow, its child
    assert re.search(r'class="num failed"><a[^>]*>1<', row), row
    assert re.search(r'class="num failure-rate">25.0 %<', row), row
    child_id = daemon.sql.fetchval("SELECT id FROM jobd.jobs WHERE parent_id = $1", flow_id)
    assert f'href="/ui/runs/{flow_id}"' in client.get(f"/ui/runs/{child_id}").text
    paged = client.get("/ui/runs", params={"limit": "25"}).text
    assert 'id="next-page"' not in paged  # four jobs, one page

    # The static files need no session; the page is whole without them.
    assert anonymous.get("/ui/static/htmx.min.js").status_code == 200
    assert anonymous.get("/ui/static/jobd.css").headers["content-type"].startswith("text/css")
    assert anonymous.get("/ui/static/../app.py").status_code in (303, 404)

    # After sign-in, only dashboard paths: no open redirect.
    for target in ("https://evil.example/", "//evil.example/", "/v1/stats", "/ui/\\evil",
                   "/ui/\r\nSet-Cookie: evil=1", "/ui//evil.example"):
        reply = anonymous.post("/ui/login", data={"token": TOKEN, "next": target})
        assert reply.headers["location"] == "/ui/", target

    # Signing out forgets the cookie; a forged one is no session.
    reply = client.post("/ui/logout", data={"csrf": csrf(client)})
    assert reply.status_code == 303 and "Max-Age=0" in reply.headers["set-cookie"]
    forged = httpx.Client(base_url=base, follow_redirects=False, timeout=10,
                          cookies={"jobd_session": "eyJ4IjoxfQ.bad"})
    assert forged.get("/ui/").status_code == 303


def test_actions_refusals_and_audit(daemon):
    base = daemon.base
    fail_id = enqueue(base, "dash.fail", args={"text": "again"})
    assert finished(daemon, fail_id) == "failed"
    client = signed_in(base, name="alice")
    token = csrf(client)
    retry = f"/ui/runs/{fail_id}/retry"

    # Refused: no CSRF token, a wrong one, another site's origin, a cross-site fetch.
    assert client.post(retry).status_code == 403
    assert client.post(retry, data={"csrf": token + "x"}).status_code == 403
    assert client.post(retry, data={"csrf": token},
                       headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.post(retry, data={"csrf": token},
                       headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    # A read-only session sees pages but acts on nothing.
    reader = signed_in(base, token=READ_TOKEN, name="rita")
    assert reader.get(f"/ui/runs/{fail_id}").status_code == 200
    reply = reader.post(retry, data={"csrf": csrf(reader)})
    assert reply.status_code == 403 and "read-only" in reply.text
    assert state(daemon, fail_id) == "failed"
    assert daemon.sql.fetchval("SELECT attempt FROM jobd.jobs WHERE id = $1", fail_id) == 1

    # The same request, from the page's own origin with its token, retries the job.
    reply = client.post(retry, data={"csrf": token}, headers={"Origin": base})
    assert reply.status_code == 303 and reply.headers["location"] == f"/ui/runs/{fail_id}"
    wait_until(lambda: daemon.sql.fetchval(
        "SELECT attempt = 2 AND state = 'failed' FROM jobd.jobs WHERE id = $1", fail_id),
        "the retried attempt")
    assert "retried" in client.get(reply.headers["location"]).text  # the flash message

    # Bulk by filter: a dry-run count first, then the change on confirmation.
    ok_ids = [enqueue(base, "dash.ok", args={"text": str(i)}, tags=["batch-x"])
              for i in range(3)]
    for job_id in ok_ids:
        finished(daemon, job_id)
    page = client.post("/ui/runs/bulk", data={"csrf": token, "action": "delete",
                                              "tag": "batch-x"})
    assert page.status_code == 200
    assert re.search(r'id="dry-run-count">3<', page.text)
    assert daemon.sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE 'batch-x' = ANY(tags)") == 3
    reply = client.post("/ui/runs/bulk", data={"csrf": token, "action": "delete",
                                               "tag": "batch-x", "confirm": "yes"})
    assert reply.status_code == 303
    assert daemon.sql.fetchval("SELECT count(*) FROM jobd.jobs WHERE 'batch-x' = ANY(tags)") == 0
    # A bulk action without a filter is refused, not applied to every job.
    reply = client.post("/ui/runs/bulk", data={"csrf": token, "action": "cancel"})
    assert reply.status_code == 400 and "needs ids or at least one filter" in reply.text

    # Pause and resume a key: the same pause jobctl makes, seen on the overview.
    reply = client.post("/ui/pause", data={"csrf": token, "queue": "dash", "key": "k1",
                                           "back": "/ui/"})
    assert reply.status_code == 303
    assert daemon.sql.fetchval(
        "SELECT count(*) FROM jobd.pauses WHERE queue = 'dash' AND key = 'k1'") == 1
    assert 'data-key="dash/k1" class="paused"' in client.get("/ui/").text
    client.post("/ui/resume", data={"csrf": token, "queue": "dash", "key": "k1"})
    assert daemon.sql.fetchval("SELECT count(*) FROM jobd.pauses WHERE key = 'k1'") == 0
    assert client.post("/ui/pause", data={"csrf": token, "queue": "nope"}).status_code == 404

    # Every action is in the audit log, naming the user and what it acted on.
    lines = [e for e in daemon.log_events() if e.get("event") == "dashboard.request"]
    said = [(e["command"], e["user"], e["target"]) for e in lines]
    assert ("retry", "alice", f"ids=[{fail_id}]") in said
    assert ("delete", "alice", "tag=batch-x") in said
    assert ("pause", "alice", "queue=dash key=k1") in said
    assert all(e["user"] != "rita" for e in lines)  # refused before the command
    refused = [e for e in daemon.log_events() if e.get("event") == "dashboard.refused"]
    assert {e["reason"] for e in refused} >= {"CSRF token missing or wrong", "read-only session",
                                             "cross-origin request"}
    metrics = httpx.get(f"{base}/metrics").text
    for reason, n in (("dashboard_csrf", 2), ("dashboard_cross_origin", 2),
                      ("dashboard_read_only", 1)):
        assert f'jobd_http_errors_total{{reason="{reason}"}} {n}.0' in metrics, reason


def test_bad_input_is_a_page_not_a_crash(daemon):
    base = daemon.base
    client = signed_in(base)
    token = csrf(client)
    cases = {
        "/ui/runs?state=nope": (400, "state"),
        "/ui/runs?limit=5000": (400, "limit"),
        "/ui/runs?cursor=abc": (400, "cursor must be a whole number"),
        "/ui/runs?created_after=yesterday": (400, "not an ISO 8601 time"),
        "/ui/runs?kind=" + "k" * 2000: (400, "kind"),
        "/ui/runs?kind=a%00b": (400, "NUL byte"),
        "/ui/runs/99999999": (404, "no job 99999999"),
        "/ui/runs/99999999999999999999": (404, "no page"),
        "/ui/runs/9999999999999999999": (400, "$.job_id"),
        "/ui/runs/0": (400, "$.job_id"),
        "/ui/nowhere": (404, "no page"),
        "/ui/runs?" + "&".join(f"f{i}=1" for i in range(500)): (400, "malformed"),
    }
    for path, (status, needle) in cases.items():
        reply = client.get(path)
        assert reply.status_code == status, (path, reply.status_code, reply.text[:200])
        assert needle in reply.text, (path, reply.text[:500])
        assert "Traceback" not in reply.text
    # Forms: not UTF-8, a NUL, a wrong action, an unknown schedule.
    bad = client.post("/ui/pause", content=b"csrf=" + token.encode() + b"&queue=\xff\xfe",
                      headers={"content-type": "application/x-www-form-urlencoded"})
    assert bad.status_code == 400
    assert client.post("/ui/pause", data={"csrf": token, "queue": "da\0sh"}).status_code == 400
    assert client.post("/ui/runs/bulk", data={"csrf": token, "action": "explode",
                                              "kind": "x"}).status_code == 400
    assert client.post("/ui/schedules/trigger", data={"csrf": token,
                                                      "name": "none"}).status_code == 404
    assert client.put("/ui/runs").status_code == 405
    # A body over limits.max_frame_bytes is cut off like the API's.
    huge = client.post("/ui/pause", content=b"q=" + b"x" * (3 * 1024 * 1024),
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert huge.status_code == 413
    # The daemon took all of that and still serves.
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert client.get("/ui/").status_code == 200
    assert not [e for e in daemon.log_events() if e.get("event") == "http.crashed"]


def test_dashboard_off_and_without_tokens(jobd):
    port = free_port()
    proc = jobd(control={"http": f"127.0.0.1:{port}"})
    reply = httpx.get(f"http://127.0.0.1:{port}/ui/", timeout=10)
    assert reply.status_code == 403 and "No token is configured" in reply.text
    port = free_port()
    proc = jobd(control={"http": f"127.0.0.1:{port}"},
                extra_toml="[dashboard]\nenabled = false\n")
    assert httpx.get(f"http://127.0.0.1:{port}/ui/", timeout=10).status_code == 404
    assert proc.jobctl("ping").returncode == 0


def test_a_run_shows_the_event_that_started_it_and_the_one_it_waits_for(daemon):
    base = daemon.base
    reply = httpx.post(f"{base}/v1/send_event", json={"name": "dash/order.placed",
                                                      "data": {"order": "A-17"}},
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert reply.status_code == 200, reply.text
    job_id = wait_until(lambda: daemon.sql.fetchval(
        "SELECT id FROM jobd.jobs WHERE kind = 'dash.approval' AND state = 'waiting'"),
        "the event-started job to wait")
    client = signed_in(base)
    page = client.get(f"/ui/runs/{job_id}").text
    event = re.search(r'<dd id="event">(.*?)</dd>', page, re.S).group(1)
    assert "dash/order.placed" in event
    waiting = re.search(r'<section id="waiting-on">(.*?)</section>', page, re.S).group(1)
    assert "dash/order.approved" in waiting and "A-17" in waiting
    assert 'hx-trigger="every 1000ms"' in page  # waiting: the page keeps polling
    httpx.post(f"{base}/v1/send_event", json={"name": "dash/order.approved",
                                              "data": {"order": "A-17", "by": "bo"}},
               headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert finished(daemon, job_id) == "completed"
    page = client.get(f"/ui/runs/{job_id}").text
    assert 'id="waiting-on"' not in page and "approved_by" in page
    assert "hx-trigger" not in page  # finished: nothing left to poll for


def test_two_daemons_accept_one_session_and_a_hang_up_mid_reply_costs_nothing(
        jobd, tmp_path, fresh_database):
    """A session signed on one daemon is good on another sharing the tokens (sessions
    live in the cookie), and clients that hang up before reading a page leave both up."""
    (tmp_path / "api-token").write_text(TOKEN + "\n")
    ports = [free_port(), free_port()]
    daemons = [jobd(modules=["tests.e2e.dashboard_handlers"],
                    control={"http": f"127.0.0.1:{port}",
                             "token_file": str(tmp_path / "api-token")}) for port in ports]
    first, second = (f"http://127.0.0.1:{port}" for port in ports)
    for i in range(60):
        enqueue(first, "dash.ok", args={"text": "x" * 2000 + str(i)})
    client = signed_in(first)
    cookie = client.cookies["jobd_session"]
    other = httpx.Client(base_url=second, cookies={"jobd_session": cookie},
                         follow_redirects=False, timeout=10)
    assert 'data-queue="dash"' in other.get("/ui/").text
    token = csrf(client)
    reply = other.post("/ui/pause", data={"csrf": token, "queue": "dash"})
    assert reply.status_code == 303  # the CSRF token is the session's, on any daemon
    other.post("/ui/resume", data={"csrf": token, "queue": "dash"})

    for _ in range(30):  # ask for the biggest page and leave before reading it
        with socket.create_connection(("127.0.0.1", ports[1])) as raw:
            raw.sendall(b"GET /ui/runs?limit=200 HTTP/1.1\r\nHost: x\r\n"
                        b"Cookie: jobd_session=" + cookie.encode() + b"\r\n\r\n")
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    assert other.get("/ui/runs", params={"limit": "200"}).status_code == 200
    for d in daemons:
        assert d.proc.poll() is None
        assert not [e for e in d.log_events() if e.get("event") == "http.crashed"]


def test_pages_during_a_database_outage_say_unavailable_and_recover(cluster, tmp_path):
    url = cluster.create_database("jobd_dashboard_outage")
    (tmp_path / "api-token").write_text(TOKEN + "\n")
    port = free_port()
    daemon = JobdProcess(tmp_path / "d", url, modules=["tests.e2e.dashboard_handlers"],
                         control={"http": f"127.0.0.1:{port}",
                                  "token_file": str(tmp_path / "api-token")})
    try:
        daemon.start()
        base = f"http://127.0.0.1:{port}"
        client = signed_in(base)
        token = csrf(client)
        cluster.stop()
        for path in ("/ui/", "/ui/runs", "/ui/runs/1", "/ui/schedules"):
            reply = client.get(path)
            assert reply.status_code == 503, (path, reply.status_code)
            assert "unavailable" in reply.text and "Traceback" not in reply.text
        assert client.post("/ui/pause", data={"csrf": token, "queue": "dash"}).status_code == 503
        assert daemon.proc.poll() is None, daemon.log_text()
        cluster.start()
        wait_until(lambda: client.get("/ui/").status_code == 200, "the overview to come back",
                   daemons=(daemon,))
        assert not [e for e in daemon.log_events() if e.get("event") == "http.crashed"]
    finally:
        daemon.kill()
