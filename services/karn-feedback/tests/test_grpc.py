"""The gRPC API through a real in-process grpcio server on a free port and a real channel."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator

import grpc
import pytest
from karn.catalog import builtin_catalog
from karn.grpc_api import KarnServicer, start_grpc_server
from karn.recommender import BlueprintRecommender
from karn.store import FieldReportStore
from oona.proto.kasmina.karn.v1 import karn_service_pb2 as pb
from oona.proto.kasmina.karn.v1 import karn_service_pb2_grpc as pb_grpc
from prometheus_client import REGISTRY

RESIDUAL_MLP, LOW_RANK, LINEAR = 1, 2, 3


def _serve(store: FieldReportStore) -> Iterator[pb_grpc.KarnStub]:
    recommender = BlueprintRecommender(store, cost_penalty=0.1, rng=random.Random(3))
    server, port = start_grpc_server(KarnServicer(store, recommender), "127.0.0.1", 0,
                                     max_workers=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.KarnStub(channel)
    finally:
        channel.close()
        server.stop(None).wait()


@pytest.fixture
def karn(store: FieldReportStore) -> Iterator[pb_grpc.KarnStub]:
    yield from _serve(store)


def test_list_blueprints_returns_the_catalog(karn):
    response = karn.ListBlueprints(pb.ListBlueprintsRequest(), timeout=5)
    assert list(response.blueprints) == builtin_catalog()


def test_statistics_follow_the_stored_reports(karn, store, field_report):
    empty = karn.GetBlueprintStatistics(pb.GetBlueprintStatisticsRequest(), timeout=5)
    assert [(s.blueprint_id, s.reports) for s in empty.statistics] == [(1, 0), (2, 0), (3, 0)]
    store.record(field_report(LOW_RANK, "FOSSILIZED", contribution=0.3, parameters_added=200,
                              metric_before=0.5, metric_after=0.7))
    store.record(field_report(LOW_RANK, "ROLLED_BACK", parameters_added=0, metric_before=0.5,
                              metric_after=0.5))
    store.record(field_report(LINEAR, "CANCELLED"))
    response = karn.GetBlueprintStatistics(
        pb.GetBlueprintStatisticsRequest(blueprint_ids=[LOW_RANK]), timeout=5)
    (low_rank,) = response.statistics
    assert (low_rank.blueprint_name, low_rank.reports, low_rank.fossilized,
            low_rank.rolled_back, low_rank.cancelled) == ("low_rank", 2, 1, 1, 0)
    assert low_rank.mean_contribution == pytest.approx(0.3)
    assert low_rank.mean_metric_gain == pytest.approx(0.1)
    assert low_rank.mean_parameters_added == pytest.approx(100.0)


def test_recommend_ranks_fitting_blueprints_and_learns_from_reports(karn, store, field_report):
    def first_choices(n: int) -> list[int]:
        return [karn.Recommend(pb.RecommendRequest(job_id="j", layer_id="l", chunk_size=64),
                               timeout=5).recommendations[0].blueprint.blueprint_id
                for _ in range(n)]

    assert LINEAR in first_choices(30), "with no reports every blueprint gets explored"
    for _ in range(15):
        store.record(field_report(LINEAR, "CULLED", contribution=-0.1))
        store.record(field_report(RESIDUAL_MLP, "FOSSILIZED", contribution=0.1))
    assert LINEAR not in first_choices(30)

    small = karn.Recommend(pb.RecommendRequest(chunk_size=3, limit=5), timeout=5)
    assert {r.blueprint.blueprint_id for r in small.recommendations} == {RESIDUAL_MLP, LINEAR}
    top = small.recommendations[0]
    assert top.blueprint.blueprint_id == RESIDUAL_MLP
    assert top.strategy_name == "fixed_ramp"
    assert "rewards summing to 15.00 over 15 reports" in top.rationale
    scores = [r.score for r in small.recommendations]
    assert scores == sorted(scores, reverse=True)


def test_recommend_counts_what_it_serves(karn):
    before = REGISTRY.get_sample_value("karn_recommendations_total",
                                       {"blueprint": "residual_mlp"}) or 0.0
    # low_rank needs chunks of 5 or more; linear is excluded.
    request = pb.RecommendRequest(chunk_size=4, exclude_blueprint_ids=[LINEAR])
    response = karn.Recommend(request, timeout=5)
    assert [r.blueprint.name for r in response.recommendations] == ["residual_mlp"]
    after = REGISTRY.get_sample_value("karn_recommendations_total", {"blueprint": "residual_mlp"})
    assert after == before + 1


def test_nothing_fits_is_an_empty_answer_not_an_error(karn):
    # linear stops at 256; the others are excluded.
    request = pb.RecommendRequest(chunk_size=300, exclude_blueprint_ids=[RESIDUAL_MLP, LOW_RANK])
    assert list(karn.Recommend(request, timeout=5).recommendations) == []


def test_chunk_size_zero_is_an_invalid_argument(karn):
    with pytest.raises(grpc.RpcError) as caught:
        karn.Recommend(pb.RecommendRequest(chunk_size=0), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_database_outage_is_unavailable(sqlite_url, database_outage):
    store = FieldReportStore.open(sqlite_url)
    for stub in _serve(store):
        with database_outage(store):
            for call, request in [(stub.ListBlueprints, pb.ListBlueprintsRequest()),
                                  (stub.Recommend, pb.RecommendRequest(chunk_size=8))]:
                with pytest.raises(grpc.RpcError) as caught:
                    call(request, timeout=5)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(stub.ListBlueprints(pb.ListBlueprintsRequest(), timeout=5).blueprints) == 3
    store.close()


def test_a_grpc_port_in_use_is_an_os_error(store):
    servicer = KarnServicer(store, BlueprintRecommender(store, cost_penalty=0.1))
    with socket.create_server(("127.0.0.1", 0)) as taken, pytest.raises(OSError, match="bind"):
        start_grpc_server(servicer, "127.0.0.1", taken.getsockname()[1])
