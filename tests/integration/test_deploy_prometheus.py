"""deploy/prometheus: promtool (Debian's `prometheus` package) accepts the config and the alert
rules, and the rules' unit tests (alerts_test.yml) pass: each alert fires on its situation and
stays quiet on a healthy fleet. Metric names in the rules are checked against a live scrape in
test_deploy_metrics.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("check", [("check", "rules", "alerts.yml"),
                                   ("check", "config", "prometheus.yml"),
                                   ("test", "rules", "alerts_test.yml")],
                         ids=["rules", "config", "rule-unit-tests"])
def test_promtool_accepts(check: tuple[str, ...]) -> None:
    result = _promtool(*check)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_is_unit_tested() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the rule files")
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case["alert_rule_test"]}
    assert alerts == tested, f"alerts without a promtool unit test: {sorted(alerts - tested)}"
