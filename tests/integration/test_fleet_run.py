"""`make run`'s fleet job, small: every service as a real process, two jobs over gRPC, the two
controls of the grown architecture in process, a summary and a report with plots, every process
stopped. The whole loop runs: Tamiyo (told that every epoch is a plateau) germinates from health
reports with blueprints from the whole catalog, the runtime applies and acks its commands, seeds
move through the lifecycle, their field reports reach Karn's database, and Karn's statistics and
recommendation for the next seed change with them."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_fleet_run_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, "-m", "kasmina", "fleet", "--epochs", "30", "--runs",
                           "1", "--name", "smoke", "--plateau-epochs", "1", "--min-delta", "10"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "host alone" in done.stdout and "bus messages" in done.stdout
    for control in ("static-final", "insertion"):  # beside host alone, and paired with seeds
        assert re.search(rf"^{control} +0\.\d{{4}} ± ", done.stdout, re.M), done.stdout
        assert f"paired differences (seeded - {control}): mean " in done.stdout
    report = tmp_path / "runs" / "smoke" / "report.md"
    assert "training.png" in report.read_text()
    assert (tmp_path / "runs" / "smoke" / "stages.png").stat().st_size > 1000
    acked = int(re.search(r"acked ok (\d+)", done.stdout).group(1))
    assert acked >= 5, done.stdout  # germinate, promote and gate advances went through
    with sqlite3.connect(tmp_path / "runs" / "smoke" / "karn.db") as db:
        (stored,) = db.execute("SELECT count(*) FROM karn_field_reports").fetchone()
    assert stored >= 1, done.stdout  # seeds ended and Karn stored what happened to them
    before, after = done.stdout.split("Karn before the run:")[1].split("Karn after the run:")
    names = ("residual_mlp", "low_rank", "linear")
    assert all(f"{n}: rewards summing to 0.00 over 0 reports" in before for n in names), before
    reports = {n: int(re.search(rf"{n}\s+reports\s+(\d+)", after).group(1)) for n in names}
    assert sum(reports.values()) == stored, after  # the whole catalog may germinate
    learned = {n: re.search(rf"{n}: rewards summing to [\d.]+ over (\d+) reports", after).group(1)
               for n in names}
    assert learned == {n: str(reports[n]) for n in names}, after
    for service in ("karn", "tamiyo", "kasmina"):
        log = (tmp_path / "runs" / "smoke" / f"{service}.log").read_text()
        assert "Traceback" not in log, (service, log[-2000:])


def test_fleet_run_places_by_the_output_gradient_when_asked(tmp_path):
    """`make run ARGS="--placement gradient"`: the seeded jobs' layers measure the output
    gradient, every health report carries it, and Tamiyo germinates by it (its log says why)."""
    done = subprocess.run([sys.executable, "-m", "kasmina", "fleet", "--epochs", "6", "--runs",
                           "1", "--name", "grad", "--plateau-epochs", "1", "--min-delta", "10",
                           "--placement", "gradient"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counts = re.search(r"seeded jobs' health reports (\d+), with the output gradients "
                       r"Tamiyo's gradient placement reads (\d+)", done.stdout)
    assert counts and int(counts.group(1)) >= 6 and counts.group(1) == counts.group(2), (
        done.stdout)
    log = (tmp_path / "runs" / "grad" / "tamiyo.log").read_text()
    assert "largest output gradient" in log, log[-3000:]
