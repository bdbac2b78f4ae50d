"""Two Karn replicas as real processes (`python -m karn`) in the consumer group `karn`, on one
private embedded Redis and one SQLite file: reports are shared between them and each is stored
once; SIGKILL one while it holds a batch and the other takes that batch over within
KARN_RECLAIM_IDLE_MS (plus one reclaim interval and process scheduling).

"Mid-batch" is made certain rather than hoped for: the test holds SQLite's write lock while the
second part of the stream arrives, so each replica reads a batch and waits on its first commit;
the kill then finds the victim with reports delivered and none of them stored."""

from __future__ import annotations

import signal
import sqlite3
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
import redis
from oona import EmbeddedRedis, streams
from oona.contracts import FieldReport, SeedStage, StageVisit

pytestmark = pytest.mark.integration

RECLAIM_IDLE_MS = 2000
RECLAIM_INTERVAL_S = 0.2
# Before the kill: well under one batch (100), stored in well under RECLAIM_IDLE_MS, so a live
# replica never looks dead to the other (that would be a legitimate duplicate, not a bug).
BEFORE_KILL = 50
# After: more than two batches, so each replica holds one and some are still unread.
AFTER_KILL = 250
# Takeover: the victim's reports were delivered before the kill, so they are idle for
# RECLAIM_IDLE_MS at the latest that long after it; the survivor looks every RECLAIM_INTERVAL_S
# between batches; the rest is storing its own batch and scheduling on a loaded 2-core machine,
# which this margin leaves room for. The bound (12.2 s) stays far below Karn's default
# reclaim idle time (30 s): a survivor that did not reclaim at KARN_RECLAIM_IDLE_MS, or not at
# all, still fails.
_TAKEOVER_MARGIN_S = 10.0
_TAKEOVER_BOUND_S = RECLAIM_IDLE_MS / 1000 + RECLAIM_INTERVAL_S + _TAKEOVER_MARGIN_S
_WAIT_S = 30.0


def _report(index: int) -> FieldReport:
    outcome = SeedStage.SEED_STAGE_FOSSILIZED if index % 2 else SeedStage.SEED_STAGE_CULLED
    return FieldReport(
        report_id=uuid.uuid4().hex, job_id="job-replicas", layer_id="layers.0",
        seed_index=index, blueprint_id=1, strategy_name="fixed_ramp", final_stage=outcome,
        contribution=0.01, chunk_size=64, history=[StageVisit(stage=outcome)])


def _stored(database: Path) -> list[str]:
    """report_id of every stored row (a duplicate row would appear twice)."""
    with closing(sqlite3.connect(database, timeout=30)) as connection:
        return [row[0] for row in connection.execute("SELECT report_id FROM karn_field_reports")]


def _pending(client: redis.Redis, consumer: str) -> list[str]:
    rows = client.xpending_range(streams.FIELD_REPORTS, "karn", "-", "+", 1000,
                                 consumername=consumer)
    return [row["message_id"].decode() for row in rows]


def _wait(condition: Callable[[], bool], what: str, logs: Callable[[], str],
          timeout_s: float = _WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}:\n{logs()}"
        time.sleep(0.05)


def test_each_report_is_stored_once_and_a_killed_replicas_batch_is_taken_over(
        start_karn, publish_field_reports, karn_database: Path,
        oona_restartable_broker: EmbeddedRedis) -> None:
    timings = {"KARN_RECLAIM_IDLE_MS": str(RECLAIM_IDLE_MS),
               "KARN_RECLAIM_INTERVAL_S": str(RECLAIM_INTERVAL_S)}
    victim = start_karn(KARN_CONSUMER_NAME="karn-a", **timings)
    survivor = start_karn(KARN_CONSUMER_NAME="karn-b", **timings)

    def logs() -> str:
        return f"--- karn-a\n{victim.logs()}\n--- karn-b\n{survivor.logs()}"

    reports = [_report(i) for i in range(BEFORE_KILL + AFTER_KILL)]
    client = redis.Redis.from_url(oona_restartable_broker.url)
    lock = sqlite3.connect(karn_database, timeout=30, isolation_level=None)
    try:
        publish_field_reports(reports[:BEFORE_KILL])
        _wait(lambda: len(_stored(karn_database)) == BEFORE_KILL, "first reports not stored",
              logs)

        lock.execute("BEGIN IMMEDIATE")  # Karn's commits now wait (busy_timeout 30 s)
        publish_field_reports(reports[BEFORE_KILL:])

        def both_hold_a_batch() -> bool:
            return bool(_pending(client, "karn-a")) and bool(_pending(client, "karn-b"))

        _wait(both_hold_a_batch, "the replicas did not both take reports", logs)
        (group,) = client.xinfo_groups(streams.FIELD_REPORTS)
        assert group["name"] == b"karn"
        members = {c["name"] for c in client.xinfo_consumers(streams.FIELD_REPORTS, "karn")}
        assert members == {b"karn-a", b"karn-b"}, "one group, one member per replica"
        held = _pending(client, "karn-a")

        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        killed_at = time.monotonic()
        lock.execute("ROLLBACK")

        _wait(lambda: not _pending(client, "karn-a"), "the dead replica's reports were not "
              "taken over", logs, timeout_s=_TAKEOVER_BOUND_S + _WAIT_S)
        took_s = time.monotonic() - killed_at
        assert took_s <= _TAKEOVER_BOUND_S, (f"taken over after {took_s:.1f} s (bound "
                                             f"{_TAKEOVER_BOUND_S:.1f} s)")

        _wait(lambda: len(_stored(karn_database)) >= len(reports), "not every report stored",
              logs)
        _wait(lambda: client.xpending(streams.FIELD_REPORTS, "karn")["pending"] == 0,
              "reports left unacknowledged", logs)
        stored = _stored(karn_database)
        assert len(stored) == len(reports), "a report stored twice"
        assert set(stored) == {r.report_id for r in reports}
        assert client.xlen(streams.dead_letters(streams.FIELD_REPORTS)) == 0
    finally:
        lock.close()
        client.close()

    # The survivor stored the dead one's batch itself, each report once: it took over exactly
    # the reports the victim held (none of which it had committed), and met no duplicate.
    family = streams.family(streams.FIELD_REPORTS)
    assert survivor.metric(f'oona_redelivered_total{{stream="{family}"}}') == len(held)
    assert survivor.metric("karn_field_report_duplicates_total") == 0
    assert survivor.terminate() == 0
    assert "Traceback" not in survivor.logs()
