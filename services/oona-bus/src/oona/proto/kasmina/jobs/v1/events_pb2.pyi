from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EpochEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EPOCH_EVENT_KIND_UNSPECIFIED: _ClassVar[EpochEventKind]
    EPOCH_EVENT_KIND_JOB_STARTED: _ClassVar[EpochEventKind]
    EPOCH_EVENT_KIND_EPOCH_ENDED: _ClassVar[EpochEventKind]
    EPOCH_EVENT_KIND_JOB_FINISHED: _ClassVar[EpochEventKind]
    EPOCH_EVENT_KIND_JOB_FAILED: _ClassVar[EpochEventKind]
EPOCH_EVENT_KIND_UNSPECIFIED: EpochEventKind
EPOCH_EVENT_KIND_JOB_STARTED: EpochEventKind
EPOCH_EVENT_KIND_EPOCH_ENDED: EpochEventKind
EPOCH_EVENT_KIND_JOB_FINISHED: EpochEventKind
EPOCH_EVENT_KIND_JOB_FAILED: EpochEventKind

class EpochEvent(_message.Message):
    __slots__ = ("job_id", "kind", "epoch", "step", "train_loss", "val_metric", "val_metric_name", "higher_is_better", "active_seeds", "parameter_count", "message")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_METRIC_FIELD_NUMBER: _ClassVar[int]
    VAL_METRIC_NAME_FIELD_NUMBER: _ClassVar[int]
    HIGHER_IS_BETTER_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SEEDS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kind: EpochEventKind
    epoch: int
    step: int
    train_loss: float
    val_metric: float
    val_metric_name: str
    higher_is_better: bool
    active_seeds: int
    parameter_count: int
    message: str
    def __init__(self, job_id: _Optional[str] = ..., kind: _Optional[_Union[EpochEventKind, str]] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_metric: _Optional[float] = ..., val_metric_name: _Optional[str] = ..., higher_is_better: _Optional[bool] = ..., active_seeds: _Optional[int] = ..., parameter_count: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
