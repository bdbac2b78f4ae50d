"""The wire contracts in Python: message classes, their schema names, and the stage mapping.

Import messages from here rather than from the generated modules' long paths.
"""

from __future__ import annotations

from google.protobuf.message import Message

from oona.proto.kasmina.blueprints.v1.blueprint_pb2 import (
    BlueprintKind,
    BlueprintSpec,
    ParameterCost,
)
from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope, PayloadRef, Schema
from oona.proto.kasmina.jobs.v1.events_pb2 import EpochEvent, EpochEventKind
from oona.proto.kasmina.karn.v1.field_report_pb2 import FieldReport, StageVisit
from oona.proto.kasmina.seeds.v1.commands_pb2 import (
    AckReason,
    Advance,
    Cancel,
    CommandAck,
    Cull,
    EmergencyStop,
    Germinate,
    LifecycleCommand,
    PauseAdaptation,
    Reset,
    ResumeAdaptation,
    Rollback,
    SwitchPath,
)
from oona.proto.kasmina.seeds.v1.health_pb2 import LayerHealthReport
from oona.proto.kasmina.seeds.v1.stage_pb2 import SeedStage

__all__ = [
    "AckReason", "Advance", "BlueprintKind", "BlueprintSpec", "Cancel", "CommandAck", "Cull",
    "EmergencyStop", "Envelope", "EpochEvent", "EpochEventKind", "FieldReport", "Germinate",
    "LayerHealthReport", "LifecycleCommand", "ParameterCost", "PauseAdaptation", "PayloadRef",
    "Reset", "ResumeAdaptation", "Rollback", "Schema", "SeedStage", "StageVisit", "SwitchPath",
    "schema_of", "stage_from_wire", "stage_to_wire",
]

# Python `SeedStage` runs DORMANT=0 .. ROLLED_BACK=10; the wire enum keeps 0 for UNSPECIFIED.
_STAGE_OFFSET = 1
_NUM_STAGES = 11


def stage_to_wire(stage: int) -> int:
    """Python SeedStage value (0..10) -> wire `SeedStage` value (1..11)."""
    if not 0 <= stage < _NUM_STAGES:
        raise ValueError(f"not a seed stage: {stage}")
    return stage + _STAGE_OFFSET


def stage_from_wire(value: int) -> int | None:
    """Wire `SeedStage` value -> Python SeedStage value; None for SEED_STAGE_UNSPECIFIED
    (e.g. `ready_for` of a seed with no gate passed)."""
    if value == SeedStage.SEED_STAGE_UNSPECIFIED:
        return None
    if not _STAGE_OFFSET <= value < _NUM_STAGES + _STAGE_OFFSET:
        raise ValueError(f"not a wire SeedStage: {value}")
    return value - _STAGE_OFFSET


_schemas: dict[str, Schema] = {}


def schema_of(message_class: type[Message]) -> Schema:
    """The envelope schema of a message class: its full name and its package's major version."""
    name: str = message_class.DESCRIPTOR.full_name
    schema = _schemas.get(name)
    if schema is None:
        version = _package_version(message_class.DESCRIPTOR.file.package)
        schema = _schemas[name] = Schema(message_type=name, version=version)
    return schema


def _package_version(package: str) -> int:
    last = package.rsplit(".", 1)[-1]
    if not (last.startswith("v") and last[1:].isdigit()):
        raise ValueError(f"package {package!r} is not versioned (…v1)")
    return int(last[1:])
