"""Karn as a real process (`python -m karn`) on a private embedded Redis and a SQLite file:
field reports published on the bus change its statistics and its recommendation over gRPC;
reports published while it is down are all stored once it is back; SIGTERM ends it cleanly."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import pytest
import redis
from oona import streams
from oona.contracts import FieldReport, SeedStage, StageVisit
from oona.proto.kasmina.karn.v1 import karn_service_pb2 as pb

if TYPE_CHECKING:  # the fixtures' process handle (tests/integration/conftest.py)
    from conftest import KarnProcess

pytestmark = pytest.mark.integration

RESIDUAL_MLP, LINEAR = 1, 3


def _report(blueprint_id: int, fossilized: bool, report_id: str | None = None) -> FieldReport:
    outcome = SeedStage.SEED_STAGE_FOSSILIZED if fossilized else SeedStage.SEED_STAGE_CULLED
    return FieldReport(
        report_id=report_id or uuid.uuid4().hex, job_id="job-1", layer_id="layers.0",
        seed_index=0, blueprint_id=blueprint_id, strategy_name="fixed_ramp",
        final_stage=outcome, contribution=0.05 if fossilized else -0.05, chunk_size=64,
        # metric 0.05 -> 0.15: a fossilized seed's reward is min(0.05, 0.1) / 0.05 = 1, the whole
        # reward (karn.store), so the recommender's preference is not left to sampling noise
        metric_before=0.05, metric_after=0.15, higher_is_better=True,
        history=[StageVisit(stage=SeedStage.SEED_STAGE_EVALUATING, epochs=2),
                 StageVisit(stage=outcome)])


def _statistics(karn: KarnProcess) -> dict[int, pb.BlueprintStatistics]:
    response = karn.karn.GetBlueprintStatistics(pb.GetBlueprintStatisticsRequest(), timeout=5)
    return {s.blueprint_id: s for s in response.statistics}


def _wait_for_reports(karn: KarnProcess, total: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(s.reports for s in _statistics(karn).values()) < total:
        assert time.monotonic() < deadline, f"fewer than {total} reports:\n{karn.logs()}"
        time.sleep(0.1)


def _first_choices(karn: KarnProcess, rounds: int) -> list[int]:
    request = pb.RecommendRequest(job_id="job-1", layer_id="layers.0", chunk_size=64)
    return [karn.karn.Recommend(request, timeout=5).recommendations[0].blueprint.blueprint_id
            for _ in range(rounds)]


def test_field_reports_change_statistics_and_recommendation(start_karn, publish_field_reports):
    karn = start_karn()
    names = [b.name for b in karn.karn.ListBlueprints(pb.ListBlueprintsRequest(),
                                                      timeout=5).blueprints]
    assert names == ["residual_mlp", "low_rank", "linear"]
    assert all(s.reports == 0 for s in _statistics(karn).values())
    assert LINEAR in _first_choices(karn, 30), "with no reports linear gets explored"

    reports = [_report(LINEAR, fossilized=False) for _ in range(15)]
    reports += [_report(RESIDUAL_MLP, fossilized=True) for _ in range(15)]
    # Kasmina publishing the same report again (new event_id): stored once.
    publish_field_reports([*reports, reports[-1]])
    _wait_for_reports(karn, 30)

    stats = _statistics(karn)
    assert (stats[LINEAR].reports, stats[LINEAR].culled) == (15, 15)
    assert (stats[RESIDUAL_MLP].reports, stats[RESIDUAL_MLP].fossilized) == (15, 15)
    assert stats[RESIDUAL_MLP].mean_contribution == pytest.approx(0.05)
    assert LINEAR not in _first_choices(karn, 30)

    deadline = time.monotonic() + 10
    while "karn_field_report_duplicates_total 1.0" not in karn.get("/metrics")[1]:
        assert time.monotonic() < deadline, "the duplicate was not counted"
        time.sleep(0.1)
    assert 'karn_field_reports_stored_total{outcome="CULLED"} 15.0' in karn.get("/metrics")[1]

    assert karn.terminate() == 0
    logs = karn.logs()
    assert "shutting down" in logs and "database closed" in logs and "Traceback" not in logs


def test_reports_published_while_karn_is_down_are_stored_when_it_returns(
        start_karn, publish_field_reports, oona_restartable_broker):
    first = start_karn()
    publish_field_reports([_report(RESIDUAL_MLP, fossilized=True) for _ in range(3)])
    _wait_for_reports(first, 3)
    assert first.terminate() == 0

    publish_field_reports([_report(LINEAR, fossilized=False) for _ in range(7)])
    client = redis.Redis.from_url(oona_restartable_broker.url)
    try:
        # Waiting in the stream, undelivered (Redis 6.2 has no group "lag" to ask).
        (group,) = client.xinfo_groups(streams.FIELD_REPORTS)
        newest = client.xinfo_stream(streams.FIELD_REPORTS)["last-generated-id"]
        undelivered = client.xrange(streams.FIELD_REPORTS, b"(" + group["last-delivered-id"],
                                    newest)
        assert len(undelivered) == 7
        second = start_karn()
        _wait_for_reports(second, 10)
        stats = _statistics(second)
        assert (stats[RESIDUAL_MLP].fossilized, stats[LINEAR].culled) == (3, 7)
        assert client.xpending(streams.FIELD_REPORTS, "karn")["pending"] == 0
        assert client.xlen(streams.dead_letters(streams.FIELD_REPORTS)) == 0
    finally:
        client.close()
    assert second.terminate() == 0
