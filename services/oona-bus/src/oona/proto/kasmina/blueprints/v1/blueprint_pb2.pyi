from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BlueprintKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLUEPRINT_KIND_UNSPECIFIED: _ClassVar[BlueprintKind]
    BLUEPRINT_KIND_RESIDUAL_MLP: _ClassVar[BlueprintKind]
    BLUEPRINT_KIND_LOW_RANK: _ClassVar[BlueprintKind]
    BLUEPRINT_KIND_LINEAR: _ClassVar[BlueprintKind]

class BlueprintActivation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLUEPRINT_ACTIVATION_UNSPECIFIED: _ClassVar[BlueprintActivation]
    BLUEPRINT_ACTIVATION_GELU: _ClassVar[BlueprintActivation]
    BLUEPRINT_ACTIVATION_RELU: _ClassVar[BlueprintActivation]
    BLUEPRINT_ACTIVATION_TANH: _ClassVar[BlueprintActivation]
    BLUEPRINT_ACTIVATION_SILU: _ClassVar[BlueprintActivation]

class BlueprintInit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLUEPRINT_INIT_UNSPECIFIED: _ClassVar[BlueprintInit]
    BLUEPRINT_INIT_FAN_IN_UNIFORM: _ClassVar[BlueprintInit]
    BLUEPRINT_INIT_ZERO_OUTPUT: _ClassVar[BlueprintInit]

class BlueprintDim(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLUEPRINT_DIM_UNSPECIFIED: _ClassVar[BlueprintDim]
    BLUEPRINT_DIM_CHUNK: _ClassVar[BlueprintDim]
    BLUEPRINT_DIM_HIDDEN: _ClassVar[BlueprintDim]
    BLUEPRINT_DIM_RANK: _ClassVar[BlueprintDim]
BLUEPRINT_KIND_UNSPECIFIED: BlueprintKind
BLUEPRINT_KIND_RESIDUAL_MLP: BlueprintKind
BLUEPRINT_KIND_LOW_RANK: BlueprintKind
BLUEPRINT_KIND_LINEAR: BlueprintKind
BLUEPRINT_ACTIVATION_UNSPECIFIED: BlueprintActivation
BLUEPRINT_ACTIVATION_GELU: BlueprintActivation
BLUEPRINT_ACTIVATION_RELU: BlueprintActivation
BLUEPRINT_ACTIVATION_TANH: BlueprintActivation
BLUEPRINT_ACTIVATION_SILU: BlueprintActivation
BLUEPRINT_INIT_UNSPECIFIED: BlueprintInit
BLUEPRINT_INIT_FAN_IN_UNIFORM: BlueprintInit
BLUEPRINT_INIT_ZERO_OUTPUT: BlueprintInit
BLUEPRINT_DIM_UNSPECIFIED: BlueprintDim
BLUEPRINT_DIM_CHUNK: BlueprintDim
BLUEPRINT_DIM_HIDDEN: BlueprintDim
BLUEPRINT_DIM_RANK: BlueprintDim

class ParameterCost(_message.Message):
    __slots__ = ("per_chunk_squared", "per_chunk", "constant")
    PER_CHUNK_SQUARED_FIELD_NUMBER: _ClassVar[int]
    PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    per_chunk_squared: int
    per_chunk: int
    constant: int
    def __init__(self, per_chunk_squared: _Optional[int] = ..., per_chunk: _Optional[int] = ..., constant: _Optional[int] = ...) -> None: ...

class BlueprintSpec(_message.Message):
    __slots__ = ("name", "kind", "blueprint_id", "hidden", "rank", "parameter_cost", "min_chunk_size", "max_chunk_size", "description", "activation", "init", "ramp_steps", "seed_learning_rate")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COST_FIELD_NUMBER: _ClassVar[int]
    MIN_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    RAMP_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: BlueprintKind
    blueprint_id: int
    hidden: int
    rank: int
    parameter_cost: ParameterCost
    min_chunk_size: int
    max_chunk_size: int
    description: str
    activation: BlueprintActivation
    init: BlueprintInit
    ramp_steps: int
    seed_learning_rate: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[BlueprintKind, str]] = ..., blueprint_id: _Optional[int] = ..., hidden: _Optional[int] = ..., rank: _Optional[int] = ..., parameter_cost: _Optional[_Union[ParameterCost, _Mapping]] = ..., min_chunk_size: _Optional[int] = ..., max_chunk_size: _Optional[int] = ..., description: _Optional[str] = ..., activation: _Optional[_Union[BlueprintActivation, str]] = ..., init: _Optional[_Union[BlueprintInit, str]] = ..., ramp_steps: _Optional[int] = ..., seed_learning_rate: _Optional[float] = ...) -> None: ...

class BlueprintParameter(_message.Message):
    __slots__ = ("name", "shape", "fan_in", "output")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FAN_IN_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[BlueprintDim]
    fan_in: BlueprintDim
    output: bool
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[_Union[BlueprintDim, str]]] = ..., fan_in: _Optional[_Union[BlueprintDim, str]] = ..., output: _Optional[bool] = ...) -> None: ...

class BlueprintKindDefinition(_message.Message):
    __slots__ = ("kind", "parameters", "activation", "formula")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    FORMULA_FIELD_NUMBER: _ClassVar[int]
    kind: BlueprintKind
    parameters: _containers.RepeatedCompositeFieldContainer[BlueprintParameter]
    activation: bool
    formula: str
    def __init__(self, kind: _Optional[_Union[BlueprintKind, str]] = ..., parameters: _Optional[_Iterable[_Union[BlueprintParameter, _Mapping]]] = ..., activation: _Optional[bool] = ..., formula: _Optional[str] = ...) -> None: ...

class BlueprintCatalog(_message.Message):
    __slots__ = ("kinds", "blueprints")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINTS_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedCompositeFieldContainer[BlueprintKindDefinition]
    blueprints: _containers.RepeatedCompositeFieldContainer[BlueprintSpec]
    def __init__(self, kinds: _Optional[_Iterable[_Union[BlueprintKindDefinition, _Mapping]]] = ..., blueprints: _Optional[_Iterable[_Union[BlueprintSpec, _Mapping]]] = ...) -> None: ...

class BlueprintProposal(_message.Message):
    __slots__ = ("blueprint", "proposer", "trial_number", "parent_blueprint_id")
    BLUEPRINT_FIELD_NUMBER: _ClassVar[int]
    PROPOSER_FIELD_NUMBER: _ClassVar[int]
    TRIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PARENT_BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    blueprint: BlueprintSpec
    proposer: str
    trial_number: int
    parent_blueprint_id: int
    def __init__(self, blueprint: _Optional[_Union[BlueprintSpec, _Mapping]] = ..., proposer: _Optional[str] = ..., trial_number: _Optional[int] = ..., parent_blueprint_id: _Optional[int] = ...) -> None: ...
