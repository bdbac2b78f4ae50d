from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BlueprintKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLUEPRINT_KIND_UNSPECIFIED: _ClassVar[BlueprintKind]
    BLUEPRINT_KIND_RESIDUAL_MLP: _ClassVar[BlueprintKind]
    BLUEPRINT_KIND_LOW_RANK: _ClassVar[BlueprintKind]
    BLUEPRINT_KIND_LINEAR: _ClassVar[BlueprintKind]
BLUEPRINT_KIND_UNSPECIFIED: BlueprintKind
BLUEPRINT_KIND_RESIDUAL_MLP: BlueprintKind
BLUEPRINT_KIND_LOW_RANK: BlueprintKind
BLUEPRINT_KIND_LINEAR: BlueprintKind

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
    __slots__ = ("name", "kind", "blueprint_id", "hidden", "rank", "parameter_cost", "min_chunk_size", "max_chunk_size", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COST_FIELD_NUMBER: _ClassVar[int]
    MIN_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: BlueprintKind
    blueprint_id: int
    hidden: int
    rank: int
    parameter_cost: ParameterCost
    min_chunk_size: int
    max_chunk_size: int
    description: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[BlueprintKind, str]] = ..., blueprint_id: _Optional[int] = ..., hidden: _Optional[int] = ..., rank: _Optional[int] = ..., parameter_cost: _Optional[_Union[ParameterCost, _Mapping]] = ..., min_chunk_size: _Optional[int] = ..., max_chunk_size: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...
