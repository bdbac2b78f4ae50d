"""gRPC both ways, on real servers in this process: Tamiyo's `Step`, and the Karn client with
its fallback (a Karn that answers, one that is slow, one that is not there)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from oona.contracts import BlueprintSpec
from oona.contracts import SeedStage as Stage
from oona.embedded import free_port
from oona.proto.kasmina.karn.v1 import karn_service_pb2 as karn_pb
from oona.proto.kasmina.karn.v1 import karn_service_pb2_grpc as karn_grpc
from oona.proto.kasmina.tamiyo.v1 import tamiyo_service_pb2 as pb
from oona.proto.kasmina.tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo import metrics
from tamiyo.blueprints import BlueprintChoice, KarnAdvisor
from tamiyo.controller import Controller, DeliveryConfig
from tamiyo.grpc_api import TamiyoServicer, start_grpc_server
from tamiyo.policy import HeuristicPolicy, PolicyConfig
from tamiyo.validation import JobLimits


@pytest.fixture
def tamiyo(advisor) -> Iterator[pb_grpc.TamiyoStub]:
    policy = HeuristicPolicy(PolicyConfig(plateau_epochs=2), advisor)
    servicer = TamiyoServicer(Controller(policy, DeliveryConfig(over_bus=False)))
    server, port = start_grpc_server(servicer, "127.0.0.1", 0)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.TamiyoStub(channel)
    server.stop(None)


def _state(report, epoch: int, metric: float, **columns) -> pb.SystemState:
    return pb.SystemState(job_id="job-1", epoch=epoch, step=epoch * 10, val_metric=metric,
                          higher_is_better=True,
                          layers=[report(layer="fc", epoch=epoch, **columns)])


def test_step_decides_synchronously_like_the_bus_path(tamiyo, report):
    signals = [tamiyo.Step(_state(report, epoch, 0.7), timeout=5) for epoch in range(3)]
    assert [len(s.commands) for s in signals] == [0, 0, 1]
    (germinate,) = signals[2].commands
    assert germinate.germinate.blueprint_name == "low_rank" and germinate.job_id == "job-1"
    # The caller applies it at once: no apply epoch.
    assert germinate.WhichOneof("apply_at") is None
    assert "germinate fc[" in signals[2].rationale and signals[0].rationale == "no change"
    stages = [Stage.SEED_STAGE_DORMANT] * 4
    stages[germinate.seed_index] = Stage.SEED_STAGE_GERMINATED
    (promote,) = tamiyo.Step(_state(report, 3, 0.7, stages=stages), timeout=5).commands
    assert promote.advance.target_stage == Stage.SEED_STAGE_TRAINING


def test_asking_again_for_an_epoch_returns_the_same_signal(tamiyo, report):
    tamiyo.Step(_state(report, 0, 0.7), timeout=5)
    tamiyo.Step(_state(report, 1, 0.7), timeout=5)
    first = tamiyo.Step(_state(report, 2, 0.7), timeout=5)
    assert first.commands and tamiyo.Step(_state(report, 2, 0.7), timeout=5) == first
    with pytest.raises(grpc.RpcError) as older:
        tamiyo.Step(_state(report, 1, 0.7), timeout=5)
    assert older.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_step_says_when_the_stability_guard_holds_growth(tamiyo, report):
    """An accuracy that collapses after a steady run: the signal's rationale names the pause
    (and what it means: no germination until it clears)."""
    for epoch in range(6):
        assert "growth paused" not in tamiyo.Step(_state(report, epoch, 0.7), timeout=5).rationale
    paused = tamiyo.Step(_state(report, 6, 0.1), timeout=5)
    assert "growth paused: metric_spike at epoch 6" in paused.rationale, paused.rationale
    assert not any(c.WhichOneof("action") == "germinate" for c in paused.commands)


def test_step_needs_a_job_id(tamiyo):
    with pytest.raises(grpc.RpcError) as error:
        tamiyo.Step(pb.SystemState(epoch=1), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_step_refuses_malformed_state_with_the_reason(tamiyo, report):
    short = _state(report, 0, 0.7)
    del short.layers[0].stage[1:]
    huge = _state(report, 0, 0.7)
    huge.job_id = "j" * 200_000
    for state, reason in ((short, "stage has 1 elements, num_seeds is 4"),
                          (huge, "job_id 'jjj"),
                          (_state(report, 0, 0.7, variance=[1.0, -1.0, 1.0, 1.0]),
                           "chunk_variance[1] = -1.0")):
        with pytest.raises(grpc.RpcError) as error:
            tamiyo.Step(state, timeout=5)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason in error.value.details() and len(error.value.details()) < 1000
    assert tamiyo.Step(_state(report, 0, 0.7), timeout=5).rationale == "no change"


def test_step_keeps_at_most_max_jobs_and_forgets_silent_ones(advisor, report):
    now = [1000.0]
    servicer = TamiyoServicer(
        Controller(HeuristicPolicy(PolicyConfig(plateau_epochs=2), advisor),
                   DeliveryConfig(over_bus=False)),
        JobLimits(retention_s=60, max_jobs=2), clock=lambda: now[0])
    server, port = start_grpc_server(servicer, "127.0.0.1", 0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TamiyoStub(channel)

            def step(job: str) -> None:
                state = _state(report, 0, 0.7)
                state.job_id = job
                stub.Step(state, timeout=5)
            step("a")
            step("b")
            with pytest.raises(grpc.RpcError) as error:
                step("c")
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            now[0] += 30
            step("a")  # asked again: kept
            now[0] += 31  # b silent for 61 s
            step("c")
            with pytest.raises(grpc.RpcError):
                step("d")
    finally:
        server.stop(None)


def test_step_refuses_a_bus_controller(advisor):
    with pytest.raises(ValueError, match="over_bus=False"):
        TamiyoServicer(Controller(HeuristicPolicy(PolicyConfig(), advisor), DeliveryConfig()))


class FakeKarn(karn_grpc.KarnServicer):
    """Karn's Recommend, answering from a fixed list after an optional delay."""

    def __init__(self, recommendations: list[karn_pb.Recommendation], delay_s: float = 0.0):
        self.recommendations = recommendations
        self.delay_s = delay_s
        self.requests: list[karn_pb.RecommendRequest] = []

    def Recommend(self, request, context):
        self.requests.append(request)
        time.sleep(self.delay_s)
        return karn_pb.RecommendResponse(recommendations=self.recommendations)


@pytest.fixture
def karn() -> Iterator[tuple[FakeKarn, str]]:
    fake = FakeKarn([])
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    karn_grpc.add_KarnServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(None)


def _advisor(address: str, timeout_s: float = 2.0) -> KarnAdvisor:
    return KarnAdvisor(address, timeout_s, default_blueprint="residual_mlp",
                       default_strategy="fixed_ramp")


def _recommendation(name: str, strategy: str) -> karn_pb.Recommendation:
    return karn_pb.Recommendation(blueprint=BlueprintSpec(name=name, blueprint_id=3),
                                  strategy_name=strategy, score=0.9)


def test_karn_recommendation_is_used(karn):
    fake, address = karn
    advisor = _advisor(address)
    fake.recommendations = [_recommendation("linear", "grad_norm_gated"),
                            _recommendation("low_rank", "fixed_ramp")]
    assert advisor.choose("job-1", "fc", 24) == BlueprintChoice("linear", "grad_norm_gated",
                                                                "karn")
    assert (fake.requests[0].chunk_size, fake.requests[0].layer_id) == (24, "fc")
    # No strategy record for the blueprint: Tamiyo's own default.
    fake.recommendations = [_recommendation("low_rank", "")]
    assert advisor.choose("job-1", "fc", 24).strategy_name == "fixed_ramp"
    fake.recommendations = []
    assert advisor.choose("job-1", "fc", 24) is None, "nothing fits: no germination"
    advisor.close()


def test_an_allow_list_keeps_karns_best_allowed_blueprint(karn):
    fake, address = karn
    advisor = KarnAdvisor(address, 2.0, default_blueprint="residual_mlp",
                          default_strategy="fixed_ramp", allowed=frozenset({"residual_mlp"}))
    fake.recommendations = [_recommendation("linear", "grad_norm_gated"),
                            _recommendation("residual_mlp", "drift_controlled")]
    assert advisor.choose("job-1", "fc", 24) == BlueprintChoice("residual_mlp",
                                                                "drift_controlled", "karn")
    assert fake.requests[0].limit > 1, "the whole ranking is asked for"
    fake.recommendations = [_recommendation("linear", "grad_norm_gated")]
    assert advisor.choose("job-1", "fc", 24) is None, "nothing allowed fits: no germination"
    advisor.close()
    # With Karn down, the fallback is an allowed blueprint too.
    down = KarnAdvisor(f"127.0.0.1:{free_port()}", 0.2, default_blueprint="residual_mlp",
                       default_strategy="fixed_ramp", allowed=frozenset({"low_rank"}))
    assert down.choose("job-1", "fc", 24) == BlueprintChoice("low_rank", "fixed_ramp",
                                                             "fallback")
    down.close()


@pytest.mark.parametrize("karn_state", ["down", "slow"])
def test_without_a_timely_karn_the_catalog_default_is_used(karn, karn_state):
    fake, address = karn
    if karn_state == "down":
        address = f"127.0.0.1:{free_port()}"
    else:
        fake.delay_s = 1.0
        fake.recommendations = [_recommendation("linear", "grad_norm_gated")]
    advisor = _advisor(address, timeout_s=0.2)
    fallbacks = metrics.KARN_FALLBACKS._value.get()
    started = time.monotonic()
    assert advisor.choose("job-1", "fc", 24) == BlueprintChoice("residual_mlp", "fixed_ramp",
                                                                "fallback")
    assert time.monotonic() - started < 0.9
    assert metrics.KARN_FALLBACKS._value.get() == fallbacks + 1
    advisor.close()
