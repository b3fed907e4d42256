"""`jobd demo`, the README's first command, runs to the end on its own embedded database,
then (with --stay) keeps the daemon up with its dashboard until interrupted."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from tests.support import ROOT, wait_until


def test_demo_runs_to_the_end_and_stays_up_for_the_dashboard(tmp_path):
    # Not under tmp_path: another pytest session starting resets /tmp/pytest-of-<user> to
    # 0700, locking the embedded server's user out (see the cluster fixture).
    state = Path(tempfile.mkdtemp(prefix="jobd-demo-t-"))
    out = tmp_path / "demo.out"
    with out.open("w") as sink:
        demo = subprocess.Popen(
            [sys.executable, "-m", "daemon.main", "demo", "--stay", "--state-dir",
             str(state)], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
            text=True)
    try:
        wait_until(lambda: "Ctrl-C to stop" in out.read_text() or demo.poll() is not None,
                   "the demo to finish", timeout=300)
        stdout = out.read_text()
        assert demo.poll() is None, stdout[-3000:]
        assert "all done: 55 completed, 1 failed" in stdout
        assert 'jobd_jobs_finished_total{kind="stocks.pipeline",outcome="completed"' in stdout
        assert "where to look next" in stdout
        # The HTTP kind: two answered at once, one through a 202 and its callbacks.
        assert ('jobd_jobs_finished_total{kind="report.summarize",outcome="completed",'
                'queue="models"} 3.0') in stdout
        assert ('jobd_http_requests_total{kind="report.summarize",outcome="callback",'
                'status_class="2xx"} 1.0') in stdout
        assert ('jobd_http_requests_total{kind="report.summarize",outcome="completed",'
                'status_class="2xx"} 2.0') in stdout

        # The dashboard it printed answers, with the token it printed, and shows the run.
        url, token = re.search(r"dashboard (http://\S+/ui/), token (\S+),", stdout).groups()
        client = httpx.Client(follow_redirects=True, timeout=10)
        page = client.post(url + "login", data={"token": token, "name": "demo-test"})
        assert page.status_code == 200 and 'data-queue="models"' in page.text
        runs = client.get(url + "runs", params={"kind": "stocks.pipeline"}).text
        assert runs.count("<td>stocks.pipeline</td>") == 2, runs
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0
        shutil.rmtree(state, ignore_errors=True)
