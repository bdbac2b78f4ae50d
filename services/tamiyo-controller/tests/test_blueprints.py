"""Tamiyo takes Karn's recommendation, a blueprint Karn's search proposed included, and sends
its full spec in the Germinate; the fallback is named, as the runtime's catalog knows it."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from oona.contracts import BlueprintKind, BlueprintSpec, catalog, with_cost
from oona.embedded import free_port
from oona.proto.kasmina.karn.v1 import karn_service_pb2 as karn_pb
from oona.proto.kasmina.karn.v1 import karn_service_pb2_grpc as karn_grpc
from tamiyo.blueprints import BlueprintChoice, KarnAdvisor

PROPOSED = with_cost(BlueprintSpec(
    name="residual_mlp.s3", kind=BlueprintKind.BLUEPRINT_KIND_RESIDUAL_MLP,
    blueprint_id=1_000_003, hidden=96, ramp_steps=40, seed_learning_rate=2e-3,
    description="proposed by optuna-tpe (trial 3 of residual_mlp)"))


class RankingKarn(karn_grpc.KarnServicer):
    """A Karn whose Recommend answers with a fixed ranking."""

    def __init__(self) -> None:
        self.ranking: list[BlueprintSpec] = []

    def Recommend(self, request, context):
        return karn_pb.RecommendResponse(recommendations=[
            karn_pb.Recommendation(blueprint=spec, strategy_name="fixed_ramp", score=0.5)
            for spec in self.ranking])


@pytest.fixture
def karn() -> Iterator[tuple[RankingKarn, str]]:
    servicer = RankingKarn()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    karn_grpc.add_KarnServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def _advisor(address: str, allowed: frozenset[str] = frozenset(),
             timeout_s: float = 2.0) -> KarnAdvisor:
    return KarnAdvisor(address, timeout_s, default_blueprint="residual_mlp",
                       default_strategy="fixed_ramp", allowed=allowed)


def test_a_proposed_blueprint_is_chosen_and_germinated_by_its_full_spec(karn):
    servicer, address = karn
    servicer.ranking = [PROPOSED, catalog()[0]]
    advisor = _advisor(address)
    choice = advisor.choose("job-1", "fc", 24)
    advisor.close()
    assert (choice.blueprint_name, choice.source) == ("residual_mlp.s3", "karn")
    germinate = choice.germinate()
    assert germinate.WhichOneof("blueprint") == "blueprint_spec"
    assert germinate.blueprint_spec == PROPOSED  # sizes, ramp, learning rate, cost: all of it
    assert germinate.strategy_name == "fixed_ramp"


def test_a_built_in_recommendation_goes_out_as_its_spec_too(karn):
    servicer, address = karn
    servicer.ranking = [catalog()[1]]
    advisor = _advisor(address)
    germinate = advisor.choose("job-1", "fc", 24).germinate()
    advisor.close()
    assert germinate.blueprint_spec == catalog()[1]


def test_the_fallback_is_germinated_by_name():
    down = _advisor(f"127.0.0.1:{free_port()}", timeout_s=0.2)
    choice = down.choose("job-1", "fc", 24)
    down.close()
    assert choice == BlueprintChoice("residual_mlp", "fixed_ramp", "fallback")
    germinate = choice.germinate()
    assert germinate.WhichOneof("blueprint") == "blueprint_name"
    assert germinate.blueprint_name == "residual_mlp"


def test_an_allow_list_of_catalog_names_keeps_proposals_out(karn):
    servicer, address = karn
    servicer.ranking = [PROPOSED, catalog()[0]]
    advisor = _advisor(address, allowed=frozenset({"residual_mlp"}))
    choice = advisor.choose("job-1", "fc", 24)
    advisor.close()
    assert choice.germinate().blueprint_spec == catalog()[0]
