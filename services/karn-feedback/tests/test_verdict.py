"""`python -m karn verdict` as a real process on a real database (and a real Redis for the kill
switch): hold with too few reports, roll back (exit 3, the flag killed) on a planted regression
of the chunked path, promote on a planted gain, `--since` for a new rollout; and the rollout's
metrics (karn.metrics.RolloutMetrics) from the same database and the flags in Redis."""

from __future__ import annotations

import datetime
import json
import os
import random
import subprocess
import sys
import time
import uuid

import oona
import pytest
from karn import metrics
from karn.store import FieldReportStore, PathOutcomes
from oona.flags import EXECUTION_PATH, FlagKeys, FlagStore, ramp, sync_client
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families


def _plant(store: FieldReportStore, field_report, n: int, chunked_gain: float) -> None:
    rng = random.Random(7)
    for i in range(n):
        for path, gain in (("legacy", 0.02), ("chunked", chunked_gain)):
            before = rng.uniform(0.5, 0.9)
            store.record(field_report(report_id=f"{path}-{i}", execution_path=path,
                                      metric_before=before,
                                      metric_after=before + gain + rng.gauss(0, 0.01)))


def _verdict(database_url: str, *args: str, **env: str) -> tuple[int, dict]:
    result = subprocess.run(
        [sys.executable, "-m", "karn", "verdict", *args], capture_output=True, text=True,
        timeout=60, env={**os.environ, "KARN_DATABASE_URL": database_url, **env})
    assert result.returncode in (0, 3), result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.parametrize(("n", "chunked_gain", "code", "verdict"), [
    (5, -0.02, 0, "hold"), (40, -0.02, 3, "roll_back"), (40, 0.05, 0, "promote")])
def test_the_verdict_from_stored_reports(database_url, field_report, n, chunked_gain, code,
                                         verdict):
    store = FieldReportStore.open(database_url)
    _plant(store, field_report, n, chunked_gain)
    store.close()
    returncode, out = _verdict(database_url)
    assert (returncode, out["verdict"]) == (code, verdict), out
    assert out["reports"] == {"legacy": n, "chunked": n}


def test_a_roll_back_sets_the_kill_switch(database_url, field_report, oona_redis_url):
    store = FieldReportStore.open(database_url)
    _plant(store, field_report, 40, -0.02)
    store.close()
    flags = FlagStore(sync_client(oona.BusSettings.from_dsn(oona_redis_url)))
    flags.set(EXECUTION_PATH, "test", rollout_percent=30.0)
    returncode, _ = _verdict(database_url, "--kill-on-rollback", OONA_REDIS_URL=oona_redis_url)
    try:
        assert returncode == 3 and flags.get(EXECUTION_PATH).killed
        assert flags.audit(EXECUTION_PATH)[-1].who == "karn verdict"
    finally:  # the test Redis is shared with other tests
        flags.set(EXECUTION_PATH, "test", killed=False, rollout_percent=0.0)


def test_since_judges_a_new_rollout_on_its_own_reports(sqlite_url, field_report):
    store = FieldReportStore.open(sqlite_url)
    _plant(store, field_report, 40, 0.05)  # an earlier, healthy rollout
    boundary = datetime.datetime.now(datetime.UTC)
    rng = random.Random(8)
    for i in range(30):  # then a regression
        for path, gain in (("legacy", 0.02), ("chunked", -0.02)):
            before = rng.uniform(0.5, 0.9)
            store.record(field_report(report_id=f"new-{path}-{i}", execution_path=path,
                                      metric_before=before,
                                      metric_after=before + gain + rng.gauss(0, 0.01)))
    store.close()
    assert _verdict(sqlite_url)[1]["reports"] == {"legacy": 70, "chunked": 70}
    returncode, out = _verdict(sqlite_url, "--since", boundary.isoformat())
    assert (returncode, out["verdict"], out["reports"]) == (3, "roll_back",
                                                           {"legacy": 30, "chunked": 30})
    # a time without a zone is UTC
    naive = boundary.replace(tzinfo=None).isoformat()
    assert _verdict(sqlite_url, "--since", naive)[1]["reports"] == {"legacy": 30, "chunked": 30}
    bad = subprocess.run([sys.executable, "-m", "karn", "verdict", "--since", "yesterday"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "KARN_DATABASE_URL": sqlite_url})
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


def _report(field_report, report_id: str, job: str, path: str, outcome: str,
            end_reason: str = "gate passed"):
    report = field_report(outcome=outcome, report_id=report_id, execution_path=path)
    report.job_id, report.end_reason = job, end_reason
    return report


def _samples(name: str) -> dict[tuple[str, ...], float]:
    """The exposition's samples of one gauge, by label values."""
    out = {}
    for family in text_string_to_metric_families(generate_latest().decode()):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sample.labels.values())] = sample.value
    return out


def test_rollout_metrics_from_the_database_and_the_flags(database_url, field_report,
                                                         oona_redis_url):
    store = FieldReportStore.open(database_url)
    flags = FlagStore(sync_client(oona.BusSettings.from_dsn(oona_redis_url)),
                      FlagKeys(f"karn-{uuid.uuid4().hex[:8]}"))
    try:
        metrics.ROLLOUT.refresh(store, flags)  # an empty database: every series at 0
        assert _samples("karn_rollback_rate") == {("legacy",): 0.0, ("chunked",): 0.0}
        assert _samples("karn_rollout_verdict")[(EXECUTION_PATH, "hold")] == 1.0
        for report in (
                _report(field_report, "a1", "job-a", "legacy", "FOSSILIZED"),
                _report(field_report, "a2", "job-a", "legacy", "CULLED"),
                _report(field_report, "b1", "job-b", "chunked", "ROLLED_BACK",
                        "non-finite values"),
                _report(field_report, "b2", "job-b", "chunked", "FOSSILIZED"),
                _report(field_report, "c1", "job-c", "chunked", "ROLLED_BACK",
                        "command x: execution path switched to legacy"),
                _report(field_report, "c2", "job-c", "legacy", "FOSSILIZED"),
                _report(field_report, "d1", "job-d", "chunked", "CULLED")):
            store.record(report)
        assert store.outcomes_by_path() == {"legacy": PathOutcomes(3, 0, 0, 2),
                                            "chunked": PathOutcomes(4, 2, 1, 2)}
        flags.set(EXECUTION_PATH, "test", rollout_percent=35.0)
        ramp(flags, EXECUTION_PATH, "test", step_s=0.0, guard=lambda _d: "regression")
        metrics.ROLLOUT.refresh(store, flags)
        assert _samples("karn_rollback_rate") == {("legacy",): 0.0, ("chunked",): 0.5}
        assert _samples("karn_failures_per_1000_adaptations") == {("legacy",): 0.0,
                                                                  ("chunked",): 250.0}
        assert _samples("karn_jobs_by_path") == {("legacy",): 2.0, ("chunked",): 2.0}
        assert _samples("karn_job_share") == {("legacy",): 0.5, ("chunked",): 0.5}
        assert _samples("oona_flag_rollout_percent")[(EXECUTION_PATH,)] == 35.0
        ramp_state = _samples("oona_flag_ramp_state")
        assert ramp_state[(EXECUTION_PATH, "halted")] == 1.0
        assert ramp_state[(EXECUTION_PATH, "idle")] == 0.0
        flags.kill(EXECUTION_PATH, "test")
        metrics.ROLLOUT.start(store, flags, refresh_s=0.05)  # the thread keeps them current
        try:
            deadline = time.monotonic() + 10
            while _samples("oona_flag_killed")[(EXECUTION_PATH,)] != 1.0:
                assert time.monotonic() < deadline, "the kill switch never reached the metrics"
                time.sleep(0.05)
            assert _samples("oona_flag_rollout_percent")[(EXECUTION_PATH,)] == 0.0  # killed
        finally:
            metrics.ROLLOUT.stop()
    finally:
        store.close()
