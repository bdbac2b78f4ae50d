from oona.proto.kasmina.blueprints.v1 import blueprint_pb2 as _blueprint_pb2
from oona.proto.kasmina.seeds.v1 import stage_pb2 as _stage_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AckReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_REASON_UNSPECIFIED: _ClassVar[AckReason]
    ACK_REASON_OK: _ClassVar[AckReason]
    ACK_REASON_UNKNOWN_JOB: _ClassVar[AckReason]
    ACK_REASON_UNKNOWN_LAYER: _ClassVar[AckReason]
    ACK_REASON_UNKNOWN_SEED: _ClassVar[AckReason]
    ACK_REASON_REFUSED_TRANSITION: _ClassVar[AckReason]
    ACK_REASON_GATE_NOT_PASSED: _ClassVar[AckReason]
    ACK_REASON_EMBARGO: _ClassVar[AckReason]
    ACK_REASON_CAPACITY: _ClassVar[AckReason]
    ACK_REASON_BLUEPRINT_DOES_NOT_FIT: _ClassVar[AckReason]
    ACK_REASON_UNKNOWN_BLUEPRINT: _ClassVar[AckReason]
    ACK_REASON_UNKNOWN_STRATEGY: _ClassVar[AckReason]
    ACK_REASON_INVALID: _ClassVar[AckReason]
    ACK_REASON_ADAPTATION_PAUSED: _ClassVar[AckReason]
    ACK_REASON_EMERGENCY_STOPPED: _ClassVar[AckReason]
    ACK_REASON_EXPIRED: _ClassVar[AckReason]
    ACK_REASON_INTERNAL_ERROR: _ClassVar[AckReason]
    ACK_REASON_DUPLICATE: _ClassVar[AckReason]
ACK_REASON_UNSPECIFIED: AckReason
ACK_REASON_OK: AckReason
ACK_REASON_UNKNOWN_JOB: AckReason
ACK_REASON_UNKNOWN_LAYER: AckReason
ACK_REASON_UNKNOWN_SEED: AckReason
ACK_REASON_REFUSED_TRANSITION: AckReason
ACK_REASON_GATE_NOT_PASSED: AckReason
ACK_REASON_EMBARGO: AckReason
ACK_REASON_CAPACITY: AckReason
ACK_REASON_BLUEPRINT_DOES_NOT_FIT: AckReason
ACK_REASON_UNKNOWN_BLUEPRINT: AckReason
ACK_REASON_UNKNOWN_STRATEGY: AckReason
ACK_REASON_INVALID: AckReason
ACK_REASON_ADAPTATION_PAUSED: AckReason
ACK_REASON_EMERGENCY_STOPPED: AckReason
ACK_REASON_EXPIRED: AckReason
ACK_REASON_INTERNAL_ERROR: AckReason
ACK_REASON_DUPLICATE: AckReason

class Germinate(_message.Message):
    __slots__ = ("blueprint_name", "blueprint_id", "blueprint_spec", "strategy_name", "strategy_id")
    BLUEPRINT_NAME_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_SPEC_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_NAME_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_ID_FIELD_NUMBER: _ClassVar[int]
    blueprint_name: str
    blueprint_id: int
    blueprint_spec: _blueprint_pb2.BlueprintSpec
    strategy_name: str
    strategy_id: int
    def __init__(self, blueprint_name: _Optional[str] = ..., blueprint_id: _Optional[int] = ..., blueprint_spec: _Optional[_Union[_blueprint_pb2.BlueprintSpec, _Mapping]] = ..., strategy_name: _Optional[str] = ..., strategy_id: _Optional[int] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Advance(_message.Message):
    __slots__ = ("target_stage", "force")
    TARGET_STAGE_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    target_stage: _stage_pb2.SeedStage
    force: bool
    def __init__(self, target_stage: _Optional[_Union[_stage_pb2.SeedStage, str]] = ..., force: _Optional[bool] = ...) -> None: ...

class Cull(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Rollback(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Reset(_message.Message):
    __slots__ = ("force",)
    FORCE_FIELD_NUMBER: _ClassVar[int]
    force: bool
    def __init__(self, force: _Optional[bool] = ...) -> None: ...

class PauseAdaptation(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeAdaptation(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EmergencyStop(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SwitchPath(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class LifecycleCommand(_message.Message):
    __slots__ = ("command_id", "job_id", "layer_id", "seed_index", "apply_at_epoch", "apply_at_step", "rationale", "germinate", "cancel", "advance", "cull", "rollback", "reset", "pause_adaptation", "resume_adaptation", "emergency_stop", "switch_path")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLY_AT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    APPLY_AT_STEP_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    GERMINATE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    ADVANCE_FIELD_NUMBER: _ClassVar[int]
    CULL_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    PAUSE_ADAPTATION_FIELD_NUMBER: _ClassVar[int]
    RESUME_ADAPTATION_FIELD_NUMBER: _ClassVar[int]
    EMERGENCY_STOP_FIELD_NUMBER: _ClassVar[int]
    SWITCH_PATH_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    job_id: str
    layer_id: str
    seed_index: int
    apply_at_epoch: int
    apply_at_step: int
    rationale: str
    germinate: Germinate
    cancel: Cancel
    advance: Advance
    cull: Cull
    rollback: Rollback
    reset: Reset
    pause_adaptation: PauseAdaptation
    resume_adaptation: ResumeAdaptation
    emergency_stop: EmergencyStop
    switch_path: SwitchPath
    def __init__(self, command_id: _Optional[str] = ..., job_id: _Optional[str] = ..., layer_id: _Optional[str] = ..., seed_index: _Optional[int] = ..., apply_at_epoch: _Optional[int] = ..., apply_at_step: _Optional[int] = ..., rationale: _Optional[str] = ..., germinate: _Optional[_Union[Germinate, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., advance: _Optional[_Union[Advance, _Mapping]] = ..., cull: _Optional[_Union[Cull, _Mapping]] = ..., rollback: _Optional[_Union[Rollback, _Mapping]] = ..., reset: _Optional[_Union[Reset, _Mapping]] = ..., pause_adaptation: _Optional[_Union[PauseAdaptation, _Mapping]] = ..., resume_adaptation: _Optional[_Union[ResumeAdaptation, _Mapping]] = ..., emergency_stop: _Optional[_Union[EmergencyStop, _Mapping]] = ..., switch_path: _Optional[_Union[SwitchPath, _Mapping]] = ...) -> None: ...

class CommandAck(_message.Message):
    __slots__ = ("command_id", "job_id", "success", "reason", "message", "stage_before", "stage_after", "applied_epoch", "applied_step", "original_reason")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    STAGE_AFTER_FIELD_NUMBER: _ClassVar[int]
    APPLIED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_REASON_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    job_id: str
    success: bool
    reason: AckReason
    message: str
    stage_before: _stage_pb2.SeedStage
    stage_after: _stage_pb2.SeedStage
    applied_epoch: int
    applied_step: int
    original_reason: AckReason
    def __init__(self, command_id: _Optional[str] = ..., job_id: _Optional[str] = ..., success: _Optional[bool] = ..., reason: _Optional[_Union[AckReason, str]] = ..., message: _Optional[str] = ..., stage_before: _Optional[_Union[_stage_pb2.SeedStage, str]] = ..., stage_after: _Optional[_Union[_stage_pb2.SeedStage, str]] = ..., applied_epoch: _Optional[int] = ..., applied_step: _Optional[int] = ..., original_reason: _Optional[_Union[AckReason, str]] = ...) -> None: ...
