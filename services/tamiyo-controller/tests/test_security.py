"""Tamiyo's Step needs its token, and Tamiyo sends Karn's token to Karn (real grpcio servers in
this process); the service refuses to start without its secrets unless OONA_INSECURE=1."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import oona.service
import pytest
from oona.contracts import BlueprintSpec
from oona.proto.kasmina.karn.v1 import karn_service_pb2 as karn_pb
from oona.proto.kasmina.karn.v1 import karn_service_pb2_grpc as karn_grpc
from oona.proto.kasmina.tamiyo.v1 import tamiyo_service_pb2 as pb
from oona.proto.kasmina.tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from oona.settings import MissingSecret
from oona.signing import authenticated_channel, with_token
from tamiyo.blueprints import BlueprintChoice, KarnAdvisor
from tamiyo.controller import Controller, DeliveryConfig
from tamiyo.grpc_api import TamiyoServicer, start_grpc_server
from tamiyo.policy import HeuristicPolicy, PolicyConfig
from tamiyo.service import load_settings

TAMIYO_TOKEN, KARN_TOKEN = "tamiyo-token-for-tests", "karn-token-for-tests"


class _Karn(karn_grpc.KarnServicer):
    def Recommend(self, request, context):  # noqa: N802
        return karn_pb.RecommendResponse(recommendations=[karn_pb.Recommendation(
            blueprint=BlueprintSpec(name="linear", blueprint_id=3), strategy_name="fixed_ramp")])


@pytest.fixture
def karn_address() -> Iterator[str]:
    server, port = oona.service.start_grpc_server(
        with_token(karn_grpc.add_KarnServicer_to_server, KARN_TOKEN), _Karn(), "127.0.0.1", 0,
        name="karn-test")
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _advisor(address: str, token: str | None) -> KarnAdvisor:
    return KarnAdvisor(address, 2.0, default_blueprint="residual_mlp",
                       default_strategy="fixed_ramp", token=token)


def test_tamiyo_sends_karns_token_and_without_it_falls_back_loudly(karn_address, caplog):
    with_token_ = _advisor(karn_address, KARN_TOKEN)
    assert with_token_.choose("job-1", "fc", 16) == BlueprintChoice("linear", "fixed_ramp",
                                                                    "karn")
    with_token_.close()
    without = _advisor(karn_address, None)
    with caplog.at_level(logging.WARNING, logger="tamiyo.blueprints"):
        assert without.choose("job-1", "fc", 16).source == "fallback"
    without.close()
    (line,) = caplog.records
    assert line.levelno == logging.ERROR and "KARN_API_TOKEN" in line.getMessage()


def test_step_needs_tamiyos_token(karn_address, report):
    policy = HeuristicPolicy(PolicyConfig(plateau_epochs=2), _advisor(karn_address, KARN_TOKEN))
    servicer = TamiyoServicer(Controller(policy, DeliveryConfig(over_bus=False)))
    server, port = start_grpc_server(servicer, "127.0.0.1", 0, token=TAMIYO_TOKEN)
    state = pb.SystemState(job_id="job-1", epoch=0, val_metric=0.5, higher_is_better=True,
                           layers=[report(layer="fc", epoch=0)])
    try:
        for token in (None, KARN_TOKEN):
            with authenticated_channel(f"127.0.0.1:{port}", token) as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    pb_grpc.TamiyoStub(channel).Step(state, timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with authenticated_channel(f"127.0.0.1:{port}", TAMIYO_TOKEN) as channel:
            assert pb_grpc.TamiyoStub(channel).Step(state, timeout=5).rationale == "no change"
    finally:
        server.stop(None)


def test_tamiyo_refuses_to_start_without_its_secrets(monkeypatch, tmp_path):
    for name in ("OONA_SIGNING_KEY", "TAMIYO_API_TOKEN", "KARN_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name + "_FILE", raising=False)
    monkeypatch.delenv("OONA_INSECURE", raising=False)
    monkeypatch.setenv("OONA_SIGNING_KEY", "fleet-key-0123456789abcdef")
    monkeypatch.setenv("TAMIYO_API_TOKEN", TAMIYO_TOKEN)
    with pytest.raises(MissingSecret, match="KARN_API_TOKEN") as refused:
        load_settings()
    assert "TAMIYO_API_TOKEN" not in str(refused.value)
    (tmp_path / "karn").write_text(KARN_TOKEN + "\n")
    monkeypatch.setenv("KARN_API_TOKEN_FILE", str(tmp_path / "karn"))
    _, tokens = load_settings()
    assert (tokens.api, tokens.karn) == (TAMIYO_TOKEN, KARN_TOKEN)
    assert TAMIYO_TOKEN not in repr(tokens) and KARN_TOKEN not in repr(tokens)
