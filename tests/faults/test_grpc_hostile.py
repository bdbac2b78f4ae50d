"""Hostile gRPC fields against the real servers of the runtime (`python -m kasmina serve`),
Karn and Tamiyo: for every RPC of every service in the descriptors of oona/proto, requests
built generically with any subset of fields set to random, huge, negative, NaN or out-of-range
values. Each call ends with OK or a typed refusal (INVALID_ARGUMENT, NOT_FOUND, ...), never
UNKNOWN or INTERNAL, within its deadline, and the server still answers a control call after."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from oona.proto.kasmina.karn.v1 import karn_service_pb2
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2
from oona.proto.kasmina.tamiyo.v1 import tamiyo_service_pb2

pytestmark = pytest.mark.integration

SERVICES = {"kasmina": runtime_service_pb2.DESCRIPTOR.services_by_name["KasminaRuntime"],
            "karn": karn_service_pb2.DESCRIPTOR.services_by_name["Karn"],
            "tamiyo": tamiyo_service_pb2.DESCRIPTOR.services_by_name["Tamiyo"]}
TYPED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
         grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED}
_CALL_TIMEOUT_S = 10.0
# A WatchJob of a job that exists streams until the job ends: its first second is enough.
_STREAM_TIMEOUT_S = 1.0
CASES = [(name, method.name) for name, service in SERVICES.items() for method in service.methods]


def _call(channel: grpc.Channel, token: str, service, method, request):
    path = f"/{service.full_name}/{method.name}"
    metadata = (("authorization", f"Bearer {token}"),)
    response_class = message_factory.GetMessageClass(method.output_type)
    if method.server_streaming:
        stream = channel.unary_stream(path, request_serializer=type(request).SerializeToString,
                                      response_deserializer=response_class.FromString)
        call = stream(request, timeout=_STREAM_TIMEOUT_S, metadata=metadata)
        try:
            for _ in call:
                pass
        except grpc.RpcError as error:
            return error.code(), error.details()
        return grpc.StatusCode.OK, ""
    unary = channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                response_deserializer=response_class.FromString)
    try:
        return grpc.StatusCode.OK, unary(request, timeout=_CALL_TIMEOUT_S, metadata=metadata)
    except grpc.RpcError as error:
        return error.code(), error.details()


def _control_call(name: str, channel: grpc.Channel, token: str) -> grpc.StatusCode:
    service = SERVICES[name]
    method, request = {
        "kasmina": ("ListSeeds", runtime_service_pb2.ListSeedsRequest(job_id="no-such-job")),
        "karn": ("ListBlueprints", karn_service_pb2.ListBlueprintsRequest()),
        "tamiyo": ("Step", tamiyo_service_pb2.SystemState()),
    }[name]
    return _call(channel, token, service, service.methods_by_name[method], request)[0]


@pytest.mark.parametrize(("name", "method_name"), CASES, ids=[f"{n}.{m}" for n, m in CASES])
def test_hostile_fields_get_a_typed_status_and_the_server_keeps_answering(
        name, method_name, hostile, fault_karn, fault_tamiyo, fault_runtime) -> None:
    process = {"karn": fault_karn, "tamiyo": fault_tamiyo, "kasmina": fault_runtime}[name]
    service = SERVICES[name]
    method = service.methods_by_name[method_name]
    request_class = message_factory.GetMessageClass(method.input_type)
    expected_control = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OK,
                        grpc.StatusCode.INVALID_ARGUMENT}
    channel = grpc.insecure_channel(f"127.0.0.1:{process.grpc_port}")

    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=hostile(request_class))
    def check(request) -> None:
        code, reply = _call(channel, process.token, service, method, request)
        allowed = TYPED | ({grpc.StatusCode.DEADLINE_EXCEEDED} if method.server_streaming
                           else set())
        assert code in allowed, (code, reply, str(request)[:500])
        if method_name == "SubmitJob" and code == grpc.StatusCode.OK:
            # a request that happened to be a valid job: stop it, the corpus trains nothing
            cancel = service.methods_by_name["CancelJob"]
            _call(channel, process.token, service, cancel,
                  runtime_service_pb2.CancelJobRequest(job_id=reply.job_id))
        assert _control_call(name, channel, process.token) in expected_control
        process.assert_up()

    try:
        check()
    finally:
        channel.close()
