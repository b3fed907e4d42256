"""`jobd demo`, the README's first command, runs to the end on its own embedded database."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT


def test_demo_runs_to_the_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "daemon.main", "demo", "--state-dir", str(tmp_path / "demo")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all done: 55 completed, 1 failed" in result.stdout
    assert 'jobd_jobs_finished_total{kind="stocks.pipeline",outcome="completed"' in result.stdout
    assert "where to look next" in result.stdout
    # The HTTP kind: two answered at once, one through a 202 and its callbacks.
    assert ('jobd_jobs_finished_total{kind="report.summarize",outcome="completed",'
            'queue="models"} 3.0') in result.stdout
    assert ('jobd_http_requests_total{kind="report.summarize",outcome="completed",'
            'status_class="2xx"} 2.0') in result.stdout
    assert ('jobd_http_requests_total{kind="report.summarize",outcome="callback",'
            'status_class="2xx"} 1.0') in result.stdout
