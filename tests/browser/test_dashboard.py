"""The dashboard at /ui/ in a real headless Chromium against a real `jobd`.

What a person does with it — sign in, read the overview, filter runs, open a failed
workflow, retry it and watch it finish, pause a key, bulk-cancel, the schedules and the
daemons — and what it must refuse: a POST without the CSRF token or from another site,
a read-only session's action, a page without a session. Checked against Postgres and
the API, not only against what the page says. Screenshots go to docs/screenshots/.

Nothing sleeps a fixed time: every wait is on a condition (WebDriverWait, wait_until).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from selenium.common.exceptions import (
    JavascriptException,
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.browser.conftest import API_TOKEN, READ_TOKEN, SCREENSHOTS, WAIT_S, Dash
from tests.support import wait_until

USER = "ada"
CSP_DIRECTIVES = ("default-src 'self'", "script-src 'self'", "style-src 'self'",
                  "img-src 'self' data:", "frame-ancestors 'none'", "base-uri 'none'",
                  "form-action 'self'")


# --------------------------------------------------------------------------- helpers


# The live part is swapped every refresh: an element found before a swap is detached
# after it (Chromium says "stale" or "does not belong to the document"). So reads are one
# script each, atomic against the swap, and clicks retry on a swapped-out element.
_SWAPPED = (StaleElementReferenceException, JavascriptException)
_READ = """
const [selector, what, name] = arguments;
const all = Array.from(document.querySelectorAll(selector));
const one = e => what === 'text' ? e.innerText.trim() : e.getAttribute(name);
return what === 'count' ? all.length : all.map(one);
"""


def wait(browser: Any) -> WebDriverWait:
    return WebDriverWait(browser, WAIT_S, ignored_exceptions=_SWAPPED)


def css(browser: Any, selector: str) -> Any:
    """An element outside the live part (forms, the login page) to type into."""
    return wait(browser).until(ec.presence_of_element_located((By.CSS_SELECTOR, selector)))


def texts(browser: Any, selector: str) -> list[str]:
    return browser.execute_script(_READ, selector, "text", None)


def attrs(browser: Any, selector: str, name: str) -> list[str | None]:
    return browser.execute_script(_READ, selector, "attr", name)


def count(browser: Any, selector: str) -> int:
    return browser.execute_script(_READ, selector, "count", None)


def text_of(browser: Any, selector: str) -> str:
    """The first match's text, once there is one."""
    return wait(browser).until(lambda b: texts(b, selector), f"{selector} on the page")[0]


def attr_of(browser: Any, selector: str, name: str) -> str | None:
    return wait(browser).until(lambda b: attrs(b, selector, name) or None,
                               f"{selector} on the page")[0]


def wait_text(browser: Any, selector: str, predicate: Any, what: str) -> str:
    def check(b: Any) -> str | bool:
        found = texts(b, selector)
        return found[0] if found and predicate(found[0]) else False
    return wait(browser).until(check, f"waiting for {what}")


def click(browser: Any, selector: str) -> None:
    """Click the element, found again if a live swap replaced it first."""
    def attempt(b: Any) -> bool:
        try:
            b.find_element(By.CSS_SELECTOR, selector).click()
        except NoSuchElementException:
            return False
        except WebDriverException as exc:
            if isinstance(exc, StaleElementReferenceException) or "document" in str(exc.msg):
                return False
            raise
        return True
    wait(browser).until(attempt, f"a click on {selector}")


def shot(browser: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOTS / f"{name}.png")), name


def sign_in(browser: Any, dash: Dash, token: str = API_TOKEN, name: str = USER,
            path: str = "/ui/") -> None:
    browser.delete_all_cookies()
    browser.get(dash.base + path)
    wait(browser).until(ec.url_contains("/ui/login"))
    css(browser, "#token").send_keys(token)
    css(browser, "#name").send_keys(name)
    click(browser, "#sign-in")
    wait(browser).until(lambda b: "/ui/login" not in b.current_url)


def mark_page(browser: Any) -> None:
    """Tag this document: a reload (or a navigation) loses the tag, a live swap keeps it."""
    browser.execute_script("window.__jobdNoReload = 'still here';")


def same_page(browser: Any) -> bool:
    return browser.execute_script("return window.__jobdNoReload || null;") == "still here"


def csrf_of(html: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', html)
    assert match, "no csrf-token meta on the page"
    return match.group(1)


def job_row(dash: Dash, job_id: int) -> dict[str, Any]:
    row = dash.sql.fetch("SELECT state, attempt, max_attempts, run_at, finished_at "
                         "FROM jobd.jobs WHERE id = $1", job_id)[0]
    return dict(row)


@pytest.fixture
def page(browser: Any, dash: Dash) -> Any:
    """The browser, signed in with the API token (write rights) as USER."""
    if getattr(browser, "jobd_role", None) != "write":
        sign_in(browser, dash)
        browser.jobd_role = "write"
    return browser


# --------------------------------------------------------------------------- sign-in


def test_sign_in_refuses_a_wrong_token_then_lets_the_right_one_in(browser, dash):
    browser.delete_all_cookies()
    browser.jobd_role = None
    browser.get(dash.base + "/ui/runs")
    wait(browser).until(ec.url_contains("/ui/login?next=/ui/runs"))
    assert css(browser, "#login").is_displayed()
    shot(browser, "login")

    css(browser, "#token").send_keys("not-the-token")
    click(browser, "#sign-in")
    assert wait_text(browser, ".flash.error", lambda t: "wrong token" in t, "the refusal")
    assert "/ui/login" in browser.current_url
    assert "not-the-token" not in browser.page_source
    assert not browser.get_cookie("jobd_session")

    css(browser, "#token").send_keys(API_TOKEN)
    css(browser, "#name").send_keys(USER)
    click(browser, "#sign-in")
    # Back to where the redirect came from, signed in by name.
    wait(browser).until(ec.url_to_be(dash.base + "/ui/runs"))
    assert text_of(browser, "h1") == "Runs"
    assert USER in text_of(browser, "header .who")
    cookie = browser.get_cookie("jobd_session")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/ui"
    browser.jobd_role = "write"


# --------------------------------------------------------------------------- pages


def queue_counts(dash: Dash, queue: str) -> dict[str, int]:
    rows = dash.sql.fetch("SELECT state::text, count(*)::int AS n FROM jobd.jobs "
                          "WHERE queue = $1 GROUP BY state", queue)
    return {r["state"]: r["n"] for r in rows}


def test_overview_shows_the_seeded_queues_with_counts(page, dash):
    page.get(dash.base + "/ui/")
    assert text_of(page, "h1") == "Overview"
    for queue in ("dash", "flow", "slow", "keyed"):
        text_of(page, f'#queues tr[data-queue="{queue}"]')
    expected = {"dash": {"completed": 3, "failed": 3}, "slow": {"running": 1},
                "keyed": {"running": 2, "available": 1}}
    for queue, counts in expected.items():
        held = queue_counts(dash, queue)
        for state, n in counts.items():
            assert held.get(state, 0) >= n, (queue, held)
            # What Postgres holds, through the live part (the page may be a poll behind).
            wait_text(page, f'#queues tr[data-queue="{queue}"] td.{state}',
                      lambda t, q=queue, s=state: t == str(queue_counts(dash, q).get(s, 0)),
                      f"{queue}'s {state} count")
    # Main has no `.throughput` cell: `.completed` and `.failed` are the last hour's.
    for cell in ("completed", "failed", "failure-rate", "oldest"):
        assert count(page, f'#queues tr[data-queue="dash"] td.{cell}') == 1
    for key in ("keyed/acme", "keyed/globex"):
        assert text_of(page, f'#keys tr[data-key="{key}"] .limits').startswith("1 at once")
    shot(page, "overview")


def test_overview_shows_the_last_hour(page, dash):
    page.get(dash.base + "/ui/")

    def hour(queue: str) -> tuple[int, int]:
        row = dash.sql.fetch(
            "SELECT count(*) AS finished, count(*) FILTER (WHERE state = 'failed') AS failed"
            " FROM jobd.jobs WHERE queue = $1 AND state IN ('completed', 'failed')"
            " AND finished_at > now() - interval '1 hour'", queue)[0]
        return row["finished"], row["failed"]

    row = '#queues tr[data-queue="dash"]'
    wait_text(page, f"{row} td.completed", lambda t: t == str(hour("dash")[0] - hour("dash")[1]),
              "the last hour's completed count")
    wait_text(page, f"{row} td.failed", lambda t: t == str(hour("dash")[1]),
              "the last hour's failed count")
    finished, failed = hour("dash")
    wait_text(page, f"{row} td.failure-rate",
              lambda t: t == f"{100 * failed / finished:.1f} %", "the failure rate")
    # keyed/acme's second job is due but held back by its key: the oldest waiting.
    oldest = '#queues tr[data-queue="keyed"] td.oldest'
    assert text_of(page, oldest).endswith("ago")
    assert attr_of(page, f"{oldest} a", "href") == f"/ui/runs/{dash.seeded['keyed'][2]}"
    assert text_of(page, '#queues tr[data-queue="later"] td.oldest') == "–"  # not due yet


def run_ids_shown(browser: Any) -> set[int]:
    return {int(i) for i in attrs(browser, "#runs tr[data-job-id]", "data-job-id") if i}


def test_runs_filter_by_state_and_by_kind(page, dash):
    page.get(dash.base + "/ui/runs")
    assert text_of(page, "h1") == "Runs"
    click(page, '#filters input[name="state"][value="failed"]')
    click(page, "#apply")
    wait(page).until(ec.url_contains("state=failed"))
    failed = {r["id"] for r in dash.sql.fetch("SELECT id FROM jobd.jobs WHERE state = 'failed'")}
    wait(page).until(lambda b: run_ids_shown(b) == failed, "the failed jobs listed")
    states = set(texts(page, "#runs tr[data-job-id] .state"))
    assert states == {"failed"}
    assert set(dash.seeded["boom"]) <= failed and dash.seeded["flow"] in failed

    kind = css(page, '#filters input[name="kind"]')
    kind.clear()
    kind.send_keys("dash.boom")
    click(page, "#apply")
    wait(page).until(ec.url_contains("kind=dash.boom"))
    wait(page).until(lambda b: run_ids_shown(b) == set(dash.seeded["boom"]), "the boom jobs")
    assert "on fire" in text_of(page, f'#runs tr[data-job-id="{dash.seeded["boom"][0]}"]')
    # Each row links to its run.
    link = f'#runs tr[data-job-id="{dash.seeded["boom"][0]}"] a.run-link'
    assert attr_of(page, link, "href") == f"/ui/runs/{dash.seeded['boom'][0]}"
    shot(page, "runs")


def test_runs_filter_by_kind_alone_lists_every_state(page, dash):
    page.get(dash.base + "/ui/runs?kind=dash.ok")
    wait(page).until(lambda b: set(dash.seeded["ok"]) <= run_ids_shown(b), "the ok jobs")
    assert {int(r["id"]) for r in dash.sql.fetch(
        "SELECT id FROM jobd.jobs WHERE kind = 'dash.ok'")} == run_ids_shown(page)


def test_runs_filter_by_error_text(page, dash):
    page.get(dash.base + "/ui/runs")
    box = css(page, '#filters input[name="error"]')
    box.send_keys("PRINTER on fire")  # literal, any case
    click(page, "#apply")
    wait(page).until(ec.url_contains("error="))
    wait(page).until(lambda b: run_ids_shown(b) == {dash.seeded["boom"][1]}, "the one job")
    # A pattern character is text, not a wildcard.
    page.get(dash.base + "/ui/runs?error=%25on%20fire")
    wait(page).until(lambda b: "No job matches" in "".join(texts(b, "#runs")),
                     "no job for a literal %")


def test_a_bad_filter_is_a_one_line_refusal_not_a_crash(page, dash):
    page.get(dash.base + "/ui/runs?created_after=yesterday-ish&limit=abc")
    assert "bad_request" in text_of(page, "main")
    page.get(dash.base + "/ui/runs?state=sideways")
    assert "bad_request" in text_of(page, "main")
    page.get(dash.base + "/ui/runs/999999999")
    assert text_of(page, "h1") == "Not found"
    assert dash.daemon.proc is not None and dash.daemon.proc.poll() is None


def test_failed_workflow_shows_steps_and_traceback_and_retry_completes_live(page, dash):
    flow = dash.seeded["flow"]
    page.get(dash.base + "/ui/runs?kind=dash.flow")
    click(page, f'#runs tr[data-job-id="{flow}"] a.run-link')
    wait(page).until(ec.url_to_be(f"{dash.base}/ui/runs/{flow}"))
    assert text_of(page, "#state") == "failed"
    steps = attrs(page, "#steps tr[data-step]", "data-step")
    assert steps == ["fetch", "spawn:kids", "gather:kids", "publish"]
    assert all(texts(page, "#steps tr[data-step] .duration"))
    assert "upstream refused seed 7" in text_of(page, '#steps tr[data-step="publish"]')
    children = texts(page, "#children tr[data-job-id]")
    assert len(children) == 1 and "dash.leaf" in children[0]
    errors = texts(page, "#errors .attempt-error")
    assert len(errors) == 1 and "ConnectionError" in errors[0]
    traceback = text_of(page, "#errors .attempt-error pre.traceback")
    assert "in publish" in traceback and "dash_handlers.py" in traceback
    assert '"seed": 7' in text_of(page, "#args")
    shot(page, "run")

    click(page, "#retry")
    # 303 back to the run, which is unfinished again and so polls for its live part.
    wait_text(page, "#state", lambda t: t in ("available", "running"), "the retried state")
    assert "retried job" in text_of(page, ".flash")
    mark_page(page)
    # The second attempt holds in `publish` until the gate opens: the page is sure to
    # see the change by its live update, not by the load after the click.
    wait_until(lambda: dash.state(flow) == "running", "the second attempt to run",
               daemons=(dash.daemon,))
    (dash.gates / "flow-7").touch()
    wait_text(page, "#state", lambda t: t == "completed", "the live update to completed")
    assert same_page(page), "the page reloaded instead of swapping its live part"
    assert '"published"' in text_of(page, "#result")
    assert job_row(dash, flow)["attempt"] == 2
    # The audit line names the user and the target.
    wait_until(lambda: [e for e in dash.daemon.log_events() if e.get("command") == "retry"
                        and e.get("user") == USER and f"ids=[{flow}]" in e.get("target", "")],
               "the retry's audit line", timeout=WAIT_S)


def progress_value(browser: Any) -> float:
    # The attribute as served, not the element's property (which the browser clamps to max).
    return float(attr_of(browser, "progress#progress", "value") or 0)


def test_progress_bar_moves_without_reload(page, dash):
    page.get(f"{dash.base}/ui/runs/{dash.seeded['slow']}")
    assert text_of(page, "#state") == "running"
    mark_page(page)
    first = progress_value(page)
    wait(page).until(lambda b: progress_value(b) > first, "the progress bar to move")
    assert same_page(page)
    shot(page, "run-progress")


def test_progress_shown_is_the_jobs_percentage(page, dash):
    page.get(f"{dash.base}/ui/runs/{dash.seeded['slow']}")
    shown = float(re.search(r"([0-9.]+) %", text_of(page, "p.progress span")).group(1))
    held = dash.sql.fetchval("SELECT progress FROM jobd.jobs WHERE id = $1",
                             dash.seeded["slow"])
    # The job moves on meanwhile, a fraction of a percent per second.
    assert abs(shown - float(held)) < 5, (shown, held)
    top = float(attr_of(page, "progress#progress", "max") or 1)
    assert abs(progress_value(page) / top * 100 - float(held)) < 5
    # The list shows the same bar.
    page.get(f"{dash.base}/ui/runs?kind=dash.slow")
    text_of(page, f'#runs tr[data-job-id="{dash.seeded["slow"]}"] progress')


def paused_keys(dash: Dash, queue: str) -> list[str]:
    stats = dash.api("stats", {})
    return next(q.get("paused_keys", []) for q in stats["queues"] if q["queue"] == queue)


def test_pause_a_key_from_the_overview(page, dash):
    page.get(dash.base + "/ui/")
    row = '#keys tr[data-key="keyed/globex"]'
    assert text_of(page, f"{row} td.paused") == "no"
    click(page, f"{row} button.pause")
    wait_text(page, f"{row} td.paused", lambda t: t == "paused", "globex shown paused")
    assert "paused keyed/globex" in text_of(page, ".flash")
    assert paused_keys(dash, "keyed") == ["globex"]
    # The pause is the daemon's own: the control socket says so too.
    stats = dash.daemon.jobctl_json("stats")
    assert "globex" in next(q for q in stats["queues"] if q["queue"] == "keyed")["paused_keys"]

    click(page, f"{row} button.resume")
    wait_text(page, f"{row} td.paused", lambda t: t == "no", "globex resumed")
    assert paused_keys(dash, "keyed") == []


def test_pause_a_queue_from_the_overview(page, dash):
    page.get(dash.base + "/ui/")
    row = '#queues tr[data-queue="later"]'
    click(page, f"{row} button.pause")
    wait(page).until(lambda b: "paused" in "".join(texts(b, row)),
                     "the queue shown paused")
    assert "paused later" in text_of(page, ".flash")
    assert next(q for q in dash.api("stats", {})["queues"] if q["queue"] == "later")["paused"]
    click(page, f"{row} button.resume")
    wait(page).until(lambda b: count(b, f"{row} button.pause"),
                     "the queue resumed")
    assert not next(q for q in dash.api("stats", {})["queues"] if q["queue"] == "later")["paused"]


def test_bulk_cancel_by_filter_counts_then_confirms(page, dash):
    later = dash.seeded["later"]
    page.get(dash.base + "/ui/runs?kind=dash.later&state=scheduled")
    wait(page).until(lambda b: run_ids_shown(b) == set(later), "the scheduled jobs")
    Select(css(page, '#bulk select[name="action"]')).select_by_visible_text("cancel")
    click(page, "#bulk-submit")
    assert text_of(page, "#dry-run-count") == str(len(later))
    # The count was a dry run: nothing changed yet.
    assert {dash.state(j) for j in later} == {"scheduled"}
    click(page, "#confirm")
    wait(page).until(ec.url_contains("/ui/runs?"))
    assert f"cancel: {len(later)} of {len(later)}" in text_of(page, ".flash")
    assert {dash.state(j) for j in later} == {"cancelled"}
    wait(page).until(lambda b: run_ids_shown(b) == set(), "the filter to match nothing now")


def test_bulk_without_a_filter_is_not_offered(page, dash):
    page.get(dash.base + "/ui/runs")
    assert attr_of(page, "#bulk-submit", "disabled") is not None


def test_schedules_page(page, dash):
    page.get(dash.base + "/ui/schedules")
    assert text_of(page, "h1") == "Schedules"
    for name in ("nightly-report", "hourly-ping"):
        row = f'#schedules tr[data-schedule="{name}"]'
        assert text_of(page, f"{row} .next-fire").startswith("in ")
        assert text_of(page, f"{row} .paused") == "no"
        assert count(page, f"{row} .last-fire") == 1
    shot(page, "schedules")

    row = '#schedules tr[data-schedule="hourly-ping"]'
    click(page, f"{row} button.pause")
    wait_text(page, f"{row} .paused", lambda t: t == "yes", "the schedule paused")
    assert dash.sql.fetchval("SELECT paused FROM jobd.schedules WHERE name = 'hourly-ping'")
    click(page, f"{row} button.resume")
    wait_text(page, f"{row} .paused", lambda t: t == "no", "the schedule resumed")
    assert not dash.sql.fetchval("SELECT paused FROM jobd.schedules WHERE name = 'hourly-ping'")

    click(page, '#schedules tr[data-schedule="nightly-report"] button.trigger')
    # The page after the click: the one before it still shows the resume's flash.
    flash = wait_text(page, ".flash", lambda t: t.startswith("fired"), "the trigger's flash")
    fired = re.search(r"fired nightly-report: job (\d+)", flash)
    assert fired, flash
    dash.wait_state(int(fired.group(1)), "completed")


def test_daemons_page_with_the_tree(page, dash):
    page.get(dash.base + "/ui/daemons")
    assert text_of(page, "h1") == "Daemons"
    text_of(page, "#daemons tr[data-daemon]")
    ids = attrs(page, "#daemons tr[data-daemon]", "data-daemon")
    held = {r["id"] for r in dash.sql.fetch("SELECT id::text FROM jobd.daemons")}
    assert len(ids) == 1 and set(ids) <= held
    assert "browser" in texts(page, "#daemons tr[data-daemon]")[0]  # the region
    assert count(page, "#tree li") > 3 and count(page, "#tree > li > ul > li"), \
        "the supervision tree is not nested"
    shot(page, "daemons")


def test_the_pages_run_under_the_csp_without_violations(page, dash):
    page.get_log("browser")  # drop what earlier tests logged
    for path in ("/ui/", "/ui/runs", "/ui/schedules", "/ui/daemons"):
        page.get(dash.base + path)
        mark_page(page)
        # htmx loaded (script-src 'self') and polls: a request it made shows in the log
        # of resources, and the page stays the same document.
        wait(page).until(lambda b: b.execute_script(
            "return typeof htmx !== 'undefined' && performance.getEntriesByType('resource')"
            ".some(e => e.initiatorType === 'xmlhttprequest')"), f"a live poll on {path}")
        assert same_page(page)
    # A finished run has nothing left to poll for: htmx loads, the page does not poll.
    page.get(dash.base + f"/ui/runs/{dash.seeded['flow']}")
    wait(page).until(lambda b: b.execute_script("return typeof htmx !== 'undefined'"),
                     "htmx on a finished run's page")
    assert page.execute_script(
        "return document.querySelector('#live').getAttribute('hx-trigger')") is None
    problems = [e["message"] for e in page.get_log("browser")
                if e["level"] in ("SEVERE", "WARNING")]
    assert not problems, problems


def test_sign_out_ends_the_session(page, dash):
    page.get(dash.base + "/ui/schedules")
    click(page, "#sign-out")
    wait(page).until(ec.url_contains("/ui/login"))
    page.jobd_role = None
    assert not page.get_cookie("jobd_session")
    page.get(dash.base + "/ui/daemons")
    wait(page).until(ec.url_contains("/ui/login?next=/ui/daemons"))


def test_sign_in_goes_nowhere_but_the_dashboard(browser, dash):
    browser.delete_all_cookies()
    browser.jobd_role = None
    for target in ("//evil.example/", "https://evil.example/ui/", "/ui/%0d%0aSet-Cookie:x=1",
                   "/ui//evil.example"):
        browser.get(f"{dash.base}/ui/login?next={target}")
        css(browser, "#token").send_keys(API_TOKEN)
        click(browser, "#sign-in")
        wait(browser).until(lambda b: "/ui/login" not in b.current_url)
        assert browser.current_url.startswith(dash.base + "/ui/"), (target, browser.current_url)
        browser.delete_all_cookies()


def test_markup_in_names_and_errors_is_shown_as_text(browser, dash):
    """A user name and a job's error holding HTML reach the page as text: nothing runs
    (an alert would fail the next WebDriver call) and no element is injected."""
    evil = "<img src=x id=injected onerror=\"window.__xss=1\">"
    job_id = dash.enqueue("dash.boom", {"what": evil})
    dash.wait_state(job_id, "failed")
    sign_in(browser, dash, name=evil, path=f"/ui/runs/{job_id}")
    browser.jobd_role = None  # signed in under another name
    wait(browser).until(ec.url_to_be(f"{dash.base}/ui/runs/{job_id}"))
    assert evil in text_of(browser, "header .who")
    assert evil in text_of(browser, "#errors .attempt-error summary")
    browser.get(f"{dash.base}/ui/runs?kind=dash.boom")
    assert evil in text_of(browser, f'#runs tr[data-job-id="{job_id}"]')
    assert count(browser, "#injected") == 0
    assert browser.execute_script("return window.__xss || null;") is None


# --------------------------------------------------------------------------- refusals


def test_post_without_the_csrf_token_is_refused(dash):
    target = dash.seeded["boom"][1]
    before = job_row(dash, target)
    with dash.client() as client:
        csrf_of(client.get(f"/ui/runs/{target}").text)
        for fields in ({}, {"csrf": ""}, {"csrf": "forged-" + "x" * 30}):
            reply = client.post(f"/ui/runs/{target}/retry", data=fields)
            assert reply.status_code == 403, (fields, reply.status_code)
            assert "CSRF check failed" in reply.text
    assert job_row(dash, target) == before


def test_post_from_a_foreign_origin_is_refused(dash):
    target = dash.seeded["boom"][1]
    before = job_row(dash, target)
    with dash.client() as client:
        csrf = csrf_of(client.get(f"/ui/runs/{target}").text)
        for headers in ({"Origin": "http://evil.example"},
                        {"Origin": dash.base.replace("127.0.0.1", "localhost")},
                        {"Sec-Fetch-Site": "cross-site"}):
            reply = client.post(f"/ui/runs/{target}/retry", data={"csrf": csrf}, headers=headers)
            assert reply.status_code == 403, (headers, reply.status_code)
            assert "CSRF check failed" in reply.text
        # Sign-in is checked the same way (login CSRF).
        reply = httpx.post(f"{dash.base}/ui/login", data={"token": API_TOKEN},
                           headers={"Origin": "http://evil.example"})
        assert reply.status_code == 403 and "jobd_session" not in reply.headers.get(
            "set-cookie", "")
    assert job_row(dash, target) == before


def test_read_only_session_cannot_retry(browser, dash):
    target = dash.seeded["boom"][2]
    before = job_row(dash, target)
    sign_in(browser, dash, token=READ_TOKEN, name="reader", path=f"/ui/runs/{target}")
    browser.jobd_role = "read"
    wait(browser).until(ec.url_to_be(f"{dash.base}/ui/runs/{target}"))
    assert "read-only" in text_of(browser, "header .who")
    assert attr_of(browser, "#retry", "disabled") is not None
    with dash.client(READ_TOKEN, "reader") as client:
        page = client.get(f"/ui/runs/{target}")
        reply = client.post(f"/ui/runs/{target}/retry", data={"csrf": csrf_of(page.text)})
        assert reply.status_code == 403 and "read-only session" in reply.text
        for path, fields in ((f"/ui/runs/{target}/delete", {}), ("/ui/pause", {"queue": "dash"}),
                             ("/ui/runs/bulk", {"action": "retry", "kind": "dash.boom"})):
            reply = client.post(path, data={"csrf": csrf_of(page.text), **fields})
            assert reply.status_code == 403, path
    assert job_row(dash, target) == before
    assert paused_keys(dash, "dash") == [] and not dash.sql.fetchval(
        "SELECT count(*) FROM jobd.pauses WHERE queue = 'dash'")


def test_no_session_is_sent_to_sign_in(dash):
    with httpx.Client(base_url=dash.base, timeout=30) as client:
        for path in ("/ui/", "/ui/runs?state=failed", f"/ui/runs/{dash.seeded['flow']}",
                     "/ui/schedules", "/ui/daemons"):
            reply = client.get(path)
            assert reply.status_code == 303, path
            assert reply.headers["location"].startswith("/ui/login?next=/ui/"), reply.headers
        reply = client.post(f"/ui/runs/{dash.seeded['boom'][1]}/retry", data={"csrf": "x"})
        assert reply.status_code in (401, 403)
        # A forged cookie is no session either.
    with httpx.Client(base_url=dash.base, timeout=30,
                      cookies={"jobd_session": "e30.forged"}) as forged:
        assert forged.get("/ui/").status_code == 303
    with httpx.Client(base_url=dash.base, timeout=30) as client:
        assert client.get("/ui/static/htmx.min.js").status_code == 200


@pytest.mark.parametrize("token", [API_TOKEN, READ_TOKEN], ids=["write", "read"])
def test_pages_carry_the_security_headers_and_no_token(dash, token):
    with dash.client(token) as client:
        pages = ["/ui/login", "/ui/", "/ui/runs", "/ui/runs?state=failed",
                 f"/ui/runs/{dash.seeded['flow']}", f"/ui/runs/{dash.seeded['slow']}",
                 "/ui/schedules", "/ui/daemons", "/ui/runs/999999999"]
        for path in pages:
            reply = client.get(path)
            assert reply.status_code in (200, 404), (path, reply.status_code)
            h = reply.headers
            policy = {d.strip() for d in h["content-security-policy"].split(";")}
            assert set(CSP_DIRECTIVES) <= policy, (path, policy)
            assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff"
            assert h["referrer-policy"] == "same-origin"
            assert h["cache-control"] == "no-store"
            for secret in (API_TOKEN, READ_TOKEN):
                assert secret not in reply.text, (path, "a token is in the page")
        wrong = client.post("/ui/login", data={"token": "a-wrong-token-typed"})
        assert wrong.status_code == 401 and "a-wrong-token-typed" not in wrong.text
        assert "content-security-policy" in wrong.headers
