"""`make run`'s fleet job, small: every service as a real process, two short jobs over gRPC,
a summary and a report with plots, every process stopped."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_fleet_run_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, "-m", "kasmina", "fleet", "--epochs", "6", "--runs",
                           "1", "--name", "smoke"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "host alone" in done.stdout and "bus messages" in done.stdout
    report = tmp_path / "runs" / "smoke" / "report.md"
    assert "training.png" in report.read_text()
    assert (tmp_path / "runs" / "smoke" / "stages.png").stat().st_size > 1000
    for service in ("karn", "tamiyo", "kasmina"):
        log = (tmp_path / "runs" / "smoke" / f"{service}.log").read_text()
        assert "Traceback" not in log, (service, log[-2000:])
