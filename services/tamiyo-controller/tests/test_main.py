"""`python -m tamiyo` configuration and refusal to start without a bus."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tamiyo.heuristics import HealthWeights
from tamiyo.settings import TamiyoSettings


def test_the_stability_guard_is_set_or_turned_off_by_environment():
    from tamiyo.stability import StabilityConfig
    assert TamiyoSettings.from_env({}).policy().stability == StabilityConfig()
    tuned = TamiyoSettings.from_env({"TAMIYO_SPIKE_MADS": "3", "TAMIYO_RESUME_EPOCHS": "5",
                                     "TAMIYO_SPIKE_BASELINE_EPOCHS": "6"}).policy().stability
    assert (tuned.spike_mads, tuned.resume_epochs, tuned.baseline_epochs) == (3.0, 5, 6)
    assert TamiyoSettings.from_env({"TAMIYO_STABILITY_GUARD": "0"}).policy().stability is None
    with pytest.raises(ValueError, match="min_baseline_epochs"):
        TamiyoSettings.from_env({"TAMIYO_SPIKE_MIN_BASELINE_EPOCHS": "9"})


def test_settings_from_the_environment():
    settings = TamiyoSettings.from_env({
        "TAMIYO_GRPC_PORT": "6000", "TAMIYO_KARN_ADDRESS": "karn:50053",
        "TAMIYO_MIN_DELTA": "0.05", "TAMIYO_DEAD_RATIO_WEIGHT": "3", "TAMIYO_HTTP_PORT": "",
        "OTHER": "x"})
    assert (settings.grpc_port, settings.http_port) == (6000, 8082)
    assert settings.karn_address == "karn:50053"
    policy = settings.policy()
    assert policy.min_delta == 0.05
    assert policy.weights == HealthWeights(variance=1.0, dead_ratio=3.0, correlation=1.0)
    limits = TamiyoSettings.from_env({"TAMIYO_JOB_RETENTION_S": "3600",
                                      "TAMIYO_MAX_JOBS": "50"}).limits()
    assert (limits.retention_s, limits.max_jobs, limits.max_layers_per_job) == (3600, 50, 4096)
    assert limits.retention_for(started=True) == 3600
    assert limits.retention_for(started=False) == 600
    short = TamiyoSettings.from_env({"TAMIYO_JOB_RETENTION_S": "300"}).limits()
    assert short.retention_for(started=False) == 300, "never longer than the retention"
    unstarted = TamiyoSettings.from_env({"TAMIYO_UNSTARTED_JOB_RETENTION_S": "60"}).limits()
    assert unstarted.retention_for(started=False) == 60


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("TAMIYO_GRPC_PORT", "many", "TAMIYO_GRPC_PORT='many'"),
    ("TAMIYO_HTTP_PORT", "70000", "http_port must be in 0..65535"),
    ("TAMIYO_PLATEAU_EPOCHS", "0", "plateau_epochs >= 1"),
    ("TAMIYO_ACK_TIMEOUT_S", "0", "ack_timeout_s > 0"),
    ("TAMIYO_JOB_RETENTION_S", "0", "job_retention_s > 0"),
    ("TAMIYO_UNSTARTED_JOB_RETENTION_S", "-1", "unstarted_job_retention_s > 0"),
    ("TAMIYO_MAX_JOBS", "0", "max_jobs >= 1"),
    ("TAMIYO_PLATEAU_EPOCHS", "256", "plateau_epochs < 256"),
])
def test_bad_settings_are_refused(variable, value, message):
    with pytest.raises(ValueError, match=message):
        TamiyoSettings.from_env({variable: value})


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tamiyo"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_without_a_bus_it_says_how_to_get_one():
    result = _run({"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "python -m oona serve-embedded" in result.stderr


def test_bad_configuration_exits_2(oona_redis_url):
    result = _run({"PATH": "/usr/bin:/bin", "OONA_REDIS_URL": oona_redis_url,
                   "TAMIYO_TICK_S": "-1"})
    assert result.returncode == 2 and "tick_s must be > 0" in result.stderr
