from oona.proto.kasmina.seeds.v1 import stage_pb2 as _stage_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StageVisit(_message.Message):
    __slots__ = ("stage", "entered_epoch", "entered_step", "epochs")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ENTERED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ENTERED_STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    stage: _stage_pb2.SeedStage
    entered_epoch: int
    entered_step: int
    epochs: int
    def __init__(self, stage: _Optional[_Union[_stage_pb2.SeedStage, str]] = ..., entered_epoch: _Optional[int] = ..., entered_step: _Optional[int] = ..., epochs: _Optional[int] = ...) -> None: ...

class FieldReport(_message.Message):
    __slots__ = ("report_id", "job_id", "layer_id", "seed_index", "blueprint_id", "blueprint_name", "strategy_id", "strategy_name", "final_stage", "history", "metric_name", "higher_is_better", "metric_before", "metric_after", "contribution", "parameters_added", "latency_cost_ms", "memory_cost_bytes", "chunk_size", "end_reason", "execution_path", "metric_history")
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_INDEX_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_NAME_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_ID_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_NAME_FIELD_NUMBER: _ClassVar[int]
    FINAL_STAGE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    METRIC_NAME_FIELD_NUMBER: _ClassVar[int]
    HIGHER_IS_BETTER_FIELD_NUMBER: _ClassVar[int]
    METRIC_BEFORE_FIELD_NUMBER: _ClassVar[int]
    METRIC_AFTER_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_ADDED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_COST_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_COST_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PATH_FIELD_NUMBER: _ClassVar[int]
    METRIC_HISTORY_FIELD_NUMBER: _ClassVar[int]
    report_id: str
    job_id: str
    layer_id: str
    seed_index: int
    blueprint_id: int
    blueprint_name: str
    strategy_id: int
    strategy_name: str
    final_stage: _stage_pb2.SeedStage
    history: _containers.RepeatedCompositeFieldContainer[StageVisit]
    metric_name: str
    higher_is_better: bool
    metric_before: float
    metric_after: float
    contribution: float
    parameters_added: int
    latency_cost_ms: float
    memory_cost_bytes: int
    chunk_size: int
    end_reason: str
    execution_path: str
    metric_history: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, report_id: _Optional[str] = ..., job_id: _Optional[str] = ..., layer_id: _Optional[str] = ..., seed_index: _Optional[int] = ..., blueprint_id: _Optional[int] = ..., blueprint_name: _Optional[str] = ..., strategy_id: _Optional[int] = ..., strategy_name: _Optional[str] = ..., final_stage: _Optional[_Union[_stage_pb2.SeedStage, str]] = ..., history: _Optional[_Iterable[_Union[StageVisit, _Mapping]]] = ..., metric_name: _Optional[str] = ..., higher_is_better: _Optional[bool] = ..., metric_before: _Optional[float] = ..., metric_after: _Optional[float] = ..., contribution: _Optional[float] = ..., parameters_added: _Optional[int] = ..., latency_cost_ms: _Optional[float] = ..., memory_cost_bytes: _Optional[int] = ..., chunk_size: _Optional[int] = ..., end_reason: _Optional[str] = ..., execution_path: _Optional[str] = ..., metric_history: _Optional[_Iterable[float]] = ...) -> None: ...
