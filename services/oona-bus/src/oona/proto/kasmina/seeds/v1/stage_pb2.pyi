from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class SeedStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEED_STAGE_UNSPECIFIED: _ClassVar[SeedStage]
    SEED_STAGE_DORMANT: _ClassVar[SeedStage]
    SEED_STAGE_GERMINATED: _ClassVar[SeedStage]
    SEED_STAGE_TRAINING: _ClassVar[SeedStage]
    SEED_STAGE_GRAFTING: _ClassVar[SeedStage]
    SEED_STAGE_STABILIZATION: _ClassVar[SeedStage]
    SEED_STAGE_EVALUATING: _ClassVar[SeedStage]
    SEED_STAGE_FINE_TUNING: _ClassVar[SeedStage]
    SEED_STAGE_FOSSILIZED: _ClassVar[SeedStage]
    SEED_STAGE_CULLED: _ClassVar[SeedStage]
    SEED_STAGE_CANCELLED: _ClassVar[SeedStage]
    SEED_STAGE_ROLLED_BACK: _ClassVar[SeedStage]
SEED_STAGE_UNSPECIFIED: SeedStage
SEED_STAGE_DORMANT: SeedStage
SEED_STAGE_GERMINATED: SeedStage
SEED_STAGE_TRAINING: SeedStage
SEED_STAGE_GRAFTING: SeedStage
SEED_STAGE_STABILIZATION: SeedStage
SEED_STAGE_EVALUATING: SeedStage
SEED_STAGE_FINE_TUNING: SeedStage
SEED_STAGE_FOSSILIZED: SeedStage
SEED_STAGE_CULLED: SeedStage
SEED_STAGE_CANCELLED: SeedStage
SEED_STAGE_ROLLED_BACK: SeedStage
