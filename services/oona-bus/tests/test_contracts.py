"""Wire contract conventions: UNSPECIFIED zero values, the stage mapping, packed columns, gRPC."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import descriptor_pb2 as d
from oona import codegen
from oona.contracts import (
    LayerHealthReport,
    LifecycleCommand,
    SeedStage,
    schema_of,
    stage_from_wire,
    stage_to_wire,
)
from oona.proto.kasmina.tamiyo.v1 import tamiyo_service_pb2 as pb
from oona.proto.kasmina.tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc

# DESIGN §3.2, as the Python SeedStage numbers them.
PYTHON_STAGES = ["DORMANT", "GERMINATED", "TRAINING", "GRAFTING", "STABILIZATION", "EVALUATING",
                 "FINE_TUNING", "FOSSILIZED", "CULLED", "CANCELLED", "ROLLED_BACK"]


def test_every_enum_starts_with_unspecified_zero_and_every_package_is_versioned():
    for file in codegen.descriptor_set().file:
        assert file.package.rsplit(".", 1)[-1] == "v1", file.name
        enums = list(file.enum_type) + [e for m in file.message_type for e in m.enum_type]
        for enum in enums:
            assert enum.value[0].number == 0
            assert enum.value[0].name.endswith("_UNSPECIFIED"), enum.name


def test_stage_mapping_matches_the_design_order():
    for python_value, name in enumerate(PYTHON_STAGES):
        wire = stage_to_wire(python_value)
        assert SeedStage.Name(wire) == f"SEED_STAGE_{name}"
        assert stage_from_wire(wire) == python_value
    assert stage_from_wire(SeedStage.SEED_STAGE_UNSPECIFIED) is None
    with pytest.raises(ValueError):
        stage_to_wire(11)
    with pytest.raises(ValueError):
        stage_from_wire(12)


def test_health_columns_are_packed_so_thousands_of_seeds_stay_compact():
    seeds = 4096
    report = LayerHealthReport(num_seeds=seeds, stage=[stage_to_wire(0)] * seeds,
                               blueprint_id=[-1] * seeds, alpha=[0.25] * seeds,
                               chunk_variance=[1.5] * seeds)
    # Packed: 4 bytes per float, ~1 byte per small varint, 10 per -1; unpacked would add a tag
    # byte per element.
    assert len(report.SerializeToString()) < seeds * (1 + 10 + 4 + 4) + 64
    proto = d.DescriptorProto()
    LayerHealthReport.DESCRIPTOR.CopyToProto(proto)
    columns = [f for f in proto.field if f.label == d.FieldDescriptorProto.LABEL_REPEATED]
    assert len(columns) == 14  # output_grad_sq (20) included


def test_schema_names_type_and_major_version():
    schema = schema_of(LayerHealthReport)
    assert (schema.message_type, schema.version) == ("kasmina.seeds.v1.LayerHealthReport", 1)


def test_generated_grpc_services_serve_and_call():
    class Tamiyo(pb_grpc.TamiyoServicer):
        async def Step(self, request: pb.SystemState, _context: object) -> pb.AdaptationSignal:
            command = LifecycleCommand(command_id="c1", job_id=request.job_id, layer_id="l0",
                                       seed_index=3)
            command.germinate.blueprint_name = "low_rank"
            return pb.AdaptationSignal(commands=[command], rationale=f"epoch {request.epoch}")

    async def body() -> pb.AdaptationSignal:
        server = grpc.aio.server()
        pb_grpc.add_TamiyoServicer_to_server(Tamiyo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await pb_grpc.TamiyoStub(channel).Step(pb.SystemState(job_id="j", epoch=4))
        finally:
            await server.stop(None)

    signal = asyncio.run(body())
    assert signal.rationale == "epoch 4"
    assert signal.commands[0].germinate.blueprint_name == "low_rank"
    assert signal.commands[0].WhichOneof("action") == "germinate"
