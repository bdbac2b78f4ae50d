"""`python -m karn verdict` as a real process on a real database (and a real Redis for the kill
switch): hold with too few reports, roll back (exit 3, the flag killed) on a planted regression
of the chunked path, promote on a planted gain."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import oona
import pytest
from karn.store import FieldReportStore
from oona.flags import EXECUTION_PATH, FlagStore, sync_client


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
