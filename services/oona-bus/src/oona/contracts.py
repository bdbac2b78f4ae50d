"""The wire contracts in Python: message classes, their schema names, the stage mapping, and the
built-in blueprint catalog with what every service derives from a spec (kind names, parameter
shapes and costs, validity).

Import messages from here rather than from the generated modules' long paths.
"""

from __future__ import annotations

import functools
import math
from importlib import resources

from google.protobuf import text_format
from google.protobuf.message import Message

from oona.proto.kasmina.blueprints.v1.blueprint_pb2 import (
    BlueprintActivation,
    BlueprintCatalog,
    BlueprintDim,
    BlueprintInit,
    BlueprintKind,
    BlueprintKindDefinition,
    BlueprintProposal,
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
    "AckReason", "Advance", "BlueprintActivation", "BlueprintCatalog", "BlueprintDim",
    "BlueprintInit", "BlueprintKind", "BlueprintKindDefinition", "BlueprintProposal",
    "BlueprintSpec", "BlueprintSpecError", "Cancel", "CommandAck", "Cull", "EmergencyStop",
    "Envelope", "EpochEvent", "EpochEventKind", "FieldReport", "Germinate", "LayerHealthReport",
    "LifecycleCommand", "MAX_BLUEPRINT_SIZE", "PROPOSED_BLUEPRINT_ID_BASE", "ParameterCost",
    "PauseAdaptation", "PayloadRef", "Reset", "ResumeAdaptation", "Rollback", "Schema",
    "SeedStage", "StageVisit", "SwitchPath", "UnknownBlueprintKindError", "activation_name",
    "catalog", "check_spec", "kind_definition", "kind_from_name", "kind_name", "parameter_cost",
    "parameter_shapes", "schema_of", "stage_from_wire", "stage_to_wire", "with_cost",
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


# ---------------------------------------------------------------- blueprints (DESIGN §6)
CATALOG_FILE = "blueprint_catalog.txtpb"
# Largest hidden width or rank a spec may ask for: a spec from the wire sizes a bank of
# parameters, and one with a hidden width of 2**31 must be refused rather than allocated.
MAX_BLUEPRINT_SIZE = 65_536
# The built-in catalog's ids stay below this; Karn's proposals take ids from here up.
PROPOSED_BLUEPRINT_ID_BASE = 1_000_000


class BlueprintSpecError(ValueError):
    """A `BlueprintSpec` no service can build: bad sizes, names or chunk range."""


class UnknownBlueprintKindError(BlueprintSpecError):
    """The spec names a kind this contract's catalog does not define."""


def kind_name(kind: int) -> str:
    """BLUEPRINT_KIND_RESIDUAL_MLP -> "residual_mlp": the library's name of a wire kind."""
    try:
        name: str = BlueprintKind.Name(kind)
    except ValueError:
        raise UnknownBlueprintKindError(f"unknown blueprint kind {kind}") from None
    return name.removeprefix("BLUEPRINT_KIND_").lower()


def kind_from_name(name: str) -> int:
    """"residual_mlp" -> BLUEPRINT_KIND_RESIDUAL_MLP."""
    try:
        value: int = BlueprintKind.Value(f"BLUEPRINT_KIND_{name.upper()}")
    except ValueError:
        value = BlueprintKind.BLUEPRINT_KIND_UNSPECIFIED
    if value == BlueprintKind.BLUEPRINT_KIND_UNSPECIFIED or name != name.lower():
        known = sorted(kind_name(k) for k in _catalog()[0])
        raise UnknownBlueprintKindError(f"unknown blueprint kind {name!r}; known: {known}")
    return value


def activation_name(activation: int) -> str:
    """BLUEPRINT_ACTIVATION_RELU -> "relu"; UNSPECIFIED is the default, "gelu"."""
    if activation == BlueprintActivation.BLUEPRINT_ACTIVATION_UNSPECIFIED:
        activation = BlueprintActivation.BLUEPRINT_ACTIVATION_GELU
    name: str = BlueprintActivation.Name(activation)
    return name.removeprefix("BLUEPRINT_ACTIVATION_").lower()


@functools.cache
def _catalog() -> tuple[dict[int, BlueprintKindDefinition], tuple[BlueprintSpec, ...]]:
    text = resources.files("oona").joinpath(CATALOG_FILE).read_text(encoding="utf-8")
    parsed = text_format.Parse(text, BlueprintCatalog())
    kinds: dict[int, BlueprintKindDefinition] = {}
    for definition in parsed.kinds:
        if definition.kind in kinds or not definition.parameters:
            raise BlueprintSpecError(f"{CATALOG_FILE}: kind {definition.kind} defined twice "
                                     "or with no parameters")
        kinds[definition.kind] = definition
    specs = []
    for spec in parsed.blueprints:
        if spec.HasField("parameter_cost"):
            raise BlueprintSpecError(f"{CATALOG_FILE}: {spec.name} states its parameter_cost; "
                                     "costs are derived from the kind's shapes")
        specs.append(spec)
    if len({s.blueprint_id for s in specs}) != len(specs) or len({s.name for s in specs}) != len(
            specs):
        raise BlueprintSpecError(f"{CATALOG_FILE}: blueprint ids and names must be unique")
    if any(s.blueprint_id >= PROPOSED_BLUEPRINT_ID_BASE for s in specs):
        raise BlueprintSpecError(f"{CATALOG_FILE}: built-in ids stay below "
                                 f"{PROPOSED_BLUEPRINT_ID_BASE}")
    checked = tuple(_checked(spec, kinds) for spec in specs)
    return kinds, checked


def kind_definition(kind: int) -> BlueprintKindDefinition:
    """The parameters of a kind, from the catalog file."""
    definition = _catalog()[0].get(kind)
    if definition is None:
        raise UnknownBlueprintKindError(
            f"unknown blueprint kind {kind}; the catalog defines "
            f"{sorted(kind_name(k) for k in _catalog()[0])}")
    return definition


def catalog() -> list[BlueprintSpec]:
    """The built-in blueprints by id, their parameter costs filled in (fresh copies)."""
    out = []
    for spec in _catalog()[1]:
        copy = BlueprintSpec()
        copy.CopyFrom(spec)
        out.append(copy)
    return out


def _sizes(spec: BlueprintSpec, chunk: int) -> dict[int, int]:
    return {BlueprintDim.BLUEPRINT_DIM_CHUNK: chunk, BlueprintDim.BLUEPRINT_DIM_HIDDEN: spec.hidden,
            BlueprintDim.BLUEPRINT_DIM_RANK: spec.rank}


def parameter_shapes(spec: BlueprintSpec, chunk: int) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape for one seed of `spec` on a chunk of `chunk` features."""
    return _shapes(kind_definition(spec.kind), spec, chunk)


def _shapes(definition: BlueprintKindDefinition, spec: BlueprintSpec,
            chunk: int) -> dict[str, tuple[int, ...]]:
    sizes = _sizes(spec, chunk)
    return {p.name: tuple(sizes[d] for d in p.shape) for p in definition.parameters}


def parameter_cost(spec: BlueprintSpec) -> ParameterCost:
    """The parameters one seed adds as a polynomial in the chunk width c, derived from the shapes:
    every dimension is c or a size of the spec, so a parameter is a product with at most two c
    factors in the built-in kinds. Read off from the counts at c = 0, 1, 2, then checked at
    c = 3 (a kind with a c^3 parameter fails here, not in a wrong cost)."""
    return _cost(kind_definition(spec.kind), spec)


def _cost(definition: BlueprintKindDefinition, spec: BlueprintSpec) -> ParameterCost:
    def count(c: int) -> int:
        return sum(math.prod(shape) for shape in _shapes(definition, spec, c).values())

    f0, f1, f2 = count(0), count(1), count(2)
    squared, linear = (f2 - 2 * f1 + f0) // 2, f1 - f0 - (f2 - 2 * f1 + f0) // 2
    if squared * 9 + linear * 3 + f0 != count(3) or min(squared, linear, f0) < 0:
        raise BlueprintSpecError(f"kind {kind_name(spec.kind)}: parameters are not a "
                                 "quadratic in the chunk width")
    return ParameterCost(per_chunk_squared=squared, per_chunk=linear, constant=f0)


def with_cost(spec: BlueprintSpec) -> BlueprintSpec:
    """A checked copy of `spec` with its derived parameter_cost (whatever one it carried)."""
    return _checked(spec, _catalog()[0])


def check_spec(spec: BlueprintSpec) -> None:
    """Raise `UnknownBlueprintKindError` or `BlueprintSpecError` unless `spec` can be built."""
    _checked(spec, _catalog()[0])


def _checked(spec: BlueprintSpec, kinds: dict[int, BlueprintKindDefinition]) -> BlueprintSpec:
    definition = kinds.get(spec.kind)
    label = f"blueprint {spec.name[:60]!r} (id {spec.blueprint_id})"
    if definition is None:
        raise UnknownBlueprintKindError(
            f"{label}: unknown kind {spec.kind}; the catalog defines "
            f"{sorted(kind_name(k) for k in kinds)}")
    if not spec.name or spec.blueprint_id < 1:
        raise BlueprintSpecError(f"{label}: needs a name and a blueprint_id >= 1")
    used = {d for p in definition.parameters for d in p.shape}
    for dim, field in ((BlueprintDim.BLUEPRINT_DIM_HIDDEN, "hidden"),
                       (BlueprintDim.BLUEPRINT_DIM_RANK, "rank")):
        value = getattr(spec, field)
        if dim in used and not 1 <= value <= MAX_BLUEPRINT_SIZE:
            raise BlueprintSpecError(f"{label}: kind {kind_name(spec.kind)} needs {field} in "
                                     f"1..{MAX_BLUEPRINT_SIZE}, got {value}")
        if dim not in used and value:
            raise BlueprintSpecError(f"{label}: kind {kind_name(spec.kind)} has no {field}")
    if spec.activation and not definition.activation:
        raise BlueprintSpecError(f"{label}: kind {kind_name(spec.kind)} has no activation")
    for enum, value in ((BlueprintActivation, spec.activation), (BlueprintInit, spec.init)):
        if value not in enum.values():
            raise BlueprintSpecError(f"{label}: unknown {enum.DESCRIPTOR.name} {value}")
    if spec.max_chunk_size and spec.max_chunk_size < max(spec.min_chunk_size, 1):
        raise BlueprintSpecError(f"{label}: max_chunk_size {spec.max_chunk_size} is below "
                                 f"min_chunk_size {spec.min_chunk_size}")
    if not (math.isfinite(spec.seed_learning_rate) and spec.seed_learning_rate >= 0):
        raise BlueprintSpecError(f"{label}: seed_learning_rate must be finite and >= 0")
    out = BlueprintSpec()
    out.CopyFrom(spec)
    out.parameter_cost.CopyFrom(_cost(definition, spec))
    return out
