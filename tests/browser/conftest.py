"""A real `jobd` serving the dashboard, seeded jobs, and a headless Chromium to drive it.

One daemon and one browser per test module (they take seconds to start); the tests of a
module share the seeded jobs and act on jobs of their own. Skips, saying why, only when
Chromium or its driver is missing (.ci/run installs both as root).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ROOT, JobdProcess, Sql, wait_until

API_TOKEN = "browser-api-token-7d1f0c9e2b"
READ_TOKEN = "browser-read-token-42a9e6b1c3"
SCREENSHOTS = ROOT / "docs" / "screenshots"
WAIT_S = 60.0  # generous: two cores shared with other test runs

CHROMIUM = next((p for p in (os.environ.get("JOBD_TEST_CHROMIUM"), "/usr/bin/chromium",
                             shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p and os.path.exists(p)), None)
CHROMEDRIVER = next((p for p in (os.environ.get("JOBD_TEST_CHROMEDRIVER"), "/usr/bin/chromedriver",
                                 shutil.which("chromedriver")) if p and os.path.exists(p)), None)

SCHEDULES = """
[dashboard]
read_token_file = "{read_token_file}"
refresh = "500ms"

[[schedules]]
name = "nightly-report"
kind = "dash.ok"
cron = "0 3 * * *"
tz = "Europe/Berlin"

[[schedules]]
name = "hourly-ping"
kind = "dash.ok"
every = "1h"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Dash:
    """The daemon, its URL, Postgres, and the ids of what the module seeded."""

    daemon: JobdProcess
    base: str
    sql: Sql
    gates: Path
    seeded: dict[str, Any] = field(default_factory=dict)

    def api(self, command: str, body: dict[str, Any]) -> Any:
        reply = httpx.post(f"{self.base}/v1/{command}", json=body, timeout=30,
                           headers={"Authorization": f"Bearer {API_TOKEN}"})
        assert reply.status_code == 200, (command, reply.status_code, reply.text)
        return reply.json()["result"]

    def enqueue(self, kind: str, args: dict[str, Any] | None = None, **options: Any) -> int:
        return self.api("enqueue", {"job": {"kind": kind, "args": args or {}, **options}})["id"]

    def state(self, job_id: int) -> str:
        return self.sql.fetchval("SELECT state FROM jobd.jobs WHERE id = $1", job_id)

    def wait_state(self, job_id: int, *states: str) -> str:
        return wait_until(lambda: self.state(job_id) in states and self.state(job_id),
                          f"job {job_id} to be {' or '.join(states)}", timeout=WAIT_S,
                          daemons=(self.daemon,))

    @contextmanager
    def client(self, token: str = API_TOKEN, name: str = "httpx") -> Iterator[httpx.Client]:
        """A plain HTTP client signed in with `token` (what a browser's cookie jar holds)."""
        with httpx.Client(base_url=self.base, timeout=30, follow_redirects=False) as client:
            reply = client.post("/ui/login", data={"token": token, "name": name})
            assert reply.status_code == 303, (reply.status_code, reply.text)
            yield client


@pytest.fixture(scope="module")
def dash_db(pg_cluster) -> Iterator[str]:
    from tests.conftest import scratch_database

    with scratch_database(pg_cluster, "jobd_dash") as url:
        yield url


@pytest.fixture(scope="module")
def dash(dash_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dash]:
    directory = tmp_path_factory.mktemp("dashd")
    (directory / "api-token").write_text(API_TOKEN + "\n")
    (directory / "read-token").write_text(READ_TOKEN + "\n")
    gates = directory / "gates"
    gates.mkdir()
    port = free_port()
    daemon = JobdProcess(
        directory / "d", dash_db, region="browser",
        modules=["tests.browser.dash_handlers"],
        queues={"dash": {"concurrency": 4}, "slow": {"concurrency": 2},
                "flow": {"concurrency": 4}, "later": {"concurrency": 2},
                "keyed": {"concurrency": 2, "key_concurrency": 1}},
        control={"http": f"127.0.0.1:{port}", "token_file": str(directory / "api-token")},
        extra_toml=SCHEDULES.format(read_token_file=directory / "read-token"))
    daemon.start()
    d = Dash(daemon, f"http://127.0.0.1:{port}", Sql(dash_db), gates)
    try:
        seed(d)
        yield d
    finally:
        daemon.kill()


def seed(d: Dash) -> None:
    """Jobs in every state the pages show: done, failed with a traceback, running with
    progress, a failed workflow with steps and a child, keyed and far-future ones."""
    s = d.seeded
    s["ok"] = [d.enqueue("dash.ok", {"n": n}, tags=["seed"]) for n in range(3)]
    s["boom"] = [d.enqueue("dash.boom", {"what": w}) for w in ("disk", "printer", "toaster")]
    s["slow"] = d.enqueue("dash.slow", {"steps": 3000, "step_s": 0.2})
    s["flow"] = d.enqueue("dash.flow", {"seed": 7, "gate": str(d.gates / "flow-7")})
    # key_concurrency 1 and a gate never opened: each key stays listed, acme with one
    # job running and one waiting.
    s["keyed"] = [d.enqueue("dash.keyed", {"gate": str(d.gates / "never")}, key=key)
                  for key in ("acme", "globex", "acme")]
    s["later"] = [d.enqueue("dash.later", {"n": n}, delay_s=86400, tags=["bulk-me"])
                  for n in range(4)]
    for job_id in s["ok"]:
        d.wait_state(job_id, "completed")
    for job_id in s["boom"]:
        d.wait_state(job_id, "failed")
    d.wait_state(s["flow"], "failed")
    d.wait_state(s["slow"], "running")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(f"needs Chromium and chromedriver (apt-get install chromium chromium-driver);"
                    f" found chromium={CHROMIUM}, chromedriver={CHROMEDRIVER}")
    from selenium import webdriver  # the test extra has it: a missing one is an error, not a skip
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    # The console, so a test can see that the CSP blocked nothing the pages need.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager then downloads nothing.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()
