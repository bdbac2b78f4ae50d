"""The runtime's gRPC API needs its token (an in-process server on a real Redis), the token
comes from KASMINA_API_TOKEN or a file and is never printed, and log lines mask every secret
the fleet passes around."""

from __future__ import annotations

import grpc
import oona
import pytest
from kasmina.service.grpc_api import start_grpc_server
from kasmina.service.jobs import JobManager
from kasmina.service.logs import redact
from kasmina.service.settings import ServiceSettings
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2 as pb
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2_grpc as pb_grpc
from oona.signing import authenticated_channel

TOKEN = "runtime-token-for-tests"


def test_the_token_comes_from_the_variable_or_its_file_and_is_never_printed(tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    settings = ServiceSettings.from_env({"KASMINA_API_TOKEN_FILE": str(tmp_path / "token")})
    assert settings.api_token == TOKEN and TOKEN not in repr(settings)
    assert ServiceSettings.from_env({"KASMINA_API_TOKEN": TOKEN}).api_token == TOKEN
    assert ServiceSettings.from_env({}).api_token is None
    with pytest.raises(ValueError, match="not both"):
        ServiceSettings.from_env({"KASMINA_API_TOKEN": TOKEN,
                                  "KASMINA_API_TOKEN_FILE": str(tmp_path / "token")})


@pytest.mark.parametrize("line", [
    "metadata (('authorization', 'Bearer tok-123'),)",
    "OONA_SIGNING_KEY=tok-123 KASMINA_API_TOKEN=tok-123",
    "OONA_SIGNING_PREVIOUS_KEYS=tok-123",
    "redis://kasmina:tok-123@redis:6379/0",
])
def test_log_lines_never_carry_a_key_or_token(line):
    assert "tok-123" not in redact(line) and "***" in redact(line)


def test_every_call_needs_the_token(oona_redis_url, tmp_path):
    manager = JobManager(oona.BusSettings.from_dsn(oona_redis_url), tmp_path / "ckpt", 2, 10)
    server, port = start_grpc_server(manager, "127.0.0.1", 0, token=TOKEN)
    try:
        for token in (None, "not-it"):
            with authenticated_channel(f"127.0.0.1:{port}", token) as channel:
                stub = pb_grpc.KasminaRuntimeStub(channel)
                for call in (
                        lambda s=stub: s.SubmitJob(
                            pb.SubmitJobRequest(job_id="j", recipe="digits"), timeout=10),
                        lambda s=stub: s.CancelJob(pb.CancelJobRequest(job_id="j"), timeout=10),
                        lambda s=stub: list(s.WatchJob(pb.WatchJobRequest(job_id="j"),
                                                       timeout=10))):
                    with pytest.raises(grpc.RpcError) as refused:
                        call()
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert manager.jobs == {}
        with authenticated_channel(f"127.0.0.1:{port}", TOKEN) as channel:
            with pytest.raises(grpc.RpcError) as missing:  # past the token: the servicer answers
                pb_grpc.KasminaRuntimeStub(channel).ListSeeds(
                    pb.ListSeedsRequest(job_id="nope"), timeout=10)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop(0)
