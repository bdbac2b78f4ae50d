"""Karn's gRPC API needs its token (a real grpcio server and channel on a real store); the token
comes from KARN_API_TOKEN or a file, and the service refuses to start without it and the
fleet's signing key unless OONA_INSECURE=1."""

from __future__ import annotations

import random

import grpc
import pytest
from karn.grpc_api import KarnServicer, start_grpc_server
from karn.recommender import BlueprintRecommender
from karn.service import load_settings
from karn.settings import KarnSettings
from oona.proto.kasmina.karn.v1 import karn_service_pb2 as pb
from oona.proto.kasmina.karn.v1 import karn_service_pb2_grpc as pb_grpc
from oona.settings import MissingSecret
from oona.signing import authenticated_channel

TOKEN = "karn-token-for-tests"


def test_the_token_comes_from_the_variable_or_its_file_and_is_never_printed(tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    from_file = KarnSettings.from_env({"KARN_API_TOKEN_FILE": str(tmp_path / "token")})
    assert from_file.api_token == TOKEN and TOKEN not in repr(from_file)
    assert KarnSettings.from_env({"KARN_API_TOKEN": TOKEN}).api_token == TOKEN
    assert KarnSettings.from_env({}).api_token is None
    with pytest.raises(ValueError, match="KARN_API_TOKEN_FILE"):
        KarnSettings.from_env({"KARN_API_TOKEN_FILE": str(tmp_path / "missing")})


def test_karn_refuses_to_start_without_its_secrets(monkeypatch):
    for name in ("OONA_SIGNING_KEY", "OONA_SIGNING_KEY_FILE", "KARN_API_TOKEN",
                 "KARN_API_TOKEN_FILE", "OONA_INSECURE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KARN_API_TOKEN", TOKEN)
    with pytest.raises(MissingSecret, match="OONA_SIGNING_KEY"):
        load_settings()
    monkeypatch.setenv("OONA_SIGNING_KEY", "fleet-key-0123456789abcdef")
    assert load_settings().api_token == TOKEN
    monkeypatch.delenv("KARN_API_TOKEN")
    with pytest.raises(MissingSecret, match="KARN_API_TOKEN"):
        load_settings()
    monkeypatch.setenv("OONA_INSECURE", "1")
    assert load_settings().api_token is None


def test_every_call_needs_the_token(store):
    recommender = BlueprintRecommender(store, cost_penalty=0.1, rng=random.Random(3))
    server, port = start_grpc_server(KarnServicer(store, recommender), "127.0.0.1", 0,
                                     max_workers=2, token=TOKEN)
    try:
        for token in (None, "not-it"):
            with authenticated_channel(f"127.0.0.1:{port}", token) as channel:
                karn = pb_grpc.KarnStub(channel)
                for call in (lambda k=karn: k.ListBlueprints(pb.ListBlueprintsRequest(), timeout=5),
                             lambda k=karn: k.Recommend(pb.RecommendRequest(chunk_size=16),
                                                        timeout=5)):
                    with pytest.raises(grpc.RpcError) as refused:
                        call()
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with authenticated_channel(f"127.0.0.1:{port}", TOKEN) as channel:
            karn = pb_grpc.KarnStub(channel)
            assert karn.ListBlueprints(pb.ListBlueprintsRequest(), timeout=5).blueprints
            assert karn.Recommend(pb.RecommendRequest(chunk_size=16), timeout=5).recommendations
    finally:
        server.stop(None).wait()
