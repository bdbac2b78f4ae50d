from oona.proto.kasmina.seeds.v1 import stage_pb2 as _stage_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LayerHealthReport(_message.Message):
    __slots__ = ("job_id", "layer_id", "epoch", "step", "num_seeds", "stage", "blueprint_id", "epochs_in_stage", "strategy_id", "alpha", "chunk_variance", "dead_ratio", "mean_abs_correlation", "reconstruction_ratio", "grad_norm", "drift", "contribution", "ready_for", "features", "output_grad_sq")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_SEEDS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_IN_STAGE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_ID_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    DEAD_RATIO_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_CORRELATION_FIELD_NUMBER: _ClassVar[int]
    RECONSTRUCTION_RATIO_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    READY_FOR_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_GRAD_SQ_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    layer_id: str
    epoch: int
    step: int
    num_seeds: int
    stage: _containers.RepeatedScalarFieldContainer[_stage_pb2.SeedStage]
    blueprint_id: _containers.RepeatedScalarFieldContainer[int]
    epochs_in_stage: _containers.RepeatedScalarFieldContainer[int]
    strategy_id: _containers.RepeatedScalarFieldContainer[int]
    alpha: _containers.RepeatedScalarFieldContainer[float]
    chunk_variance: _containers.RepeatedScalarFieldContainer[float]
    dead_ratio: _containers.RepeatedScalarFieldContainer[float]
    mean_abs_correlation: _containers.RepeatedScalarFieldContainer[float]
    reconstruction_ratio: _containers.RepeatedScalarFieldContainer[float]
    grad_norm: _containers.RepeatedScalarFieldContainer[float]
    drift: _containers.RepeatedScalarFieldContainer[float]
    contribution: _containers.RepeatedScalarFieldContainer[float]
    ready_for: _containers.RepeatedScalarFieldContainer[_stage_pb2.SeedStage]
    features: int
    output_grad_sq: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, job_id: _Optional[str] = ..., layer_id: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., num_seeds: _Optional[int] = ..., stage: _Optional[_Iterable[_Union[_stage_pb2.SeedStage, str]]] = ..., blueprint_id: _Optional[_Iterable[int]] = ..., epochs_in_stage: _Optional[_Iterable[int]] = ..., strategy_id: _Optional[_Iterable[int]] = ..., alpha: _Optional[_Iterable[float]] = ..., chunk_variance: _Optional[_Iterable[float]] = ..., dead_ratio: _Optional[_Iterable[float]] = ..., mean_abs_correlation: _Optional[_Iterable[float]] = ..., reconstruction_ratio: _Optional[_Iterable[float]] = ..., grad_norm: _Optional[_Iterable[float]] = ..., drift: _Optional[_Iterable[float]] = ..., contribution: _Optional[_Iterable[float]] = ..., ready_for: _Optional[_Iterable[_Union[_stage_pb2.SeedStage, str]]] = ..., features: _Optional[int] = ..., output_grad_sq: _Optional[_Iterable[float]] = ...) -> None: ...
