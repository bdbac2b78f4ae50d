from oona.proto.kasmina.seeds.v1 import commands_pb2 as _commands_pb2
from oona.proto.kasmina.seeds.v1 import health_pb2 as _health_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SystemState(_message.Message):
    __slots__ = ("job_id", "epoch", "step", "train_loss", "val_metric", "higher_is_better", "layers")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_METRIC_FIELD_NUMBER: _ClassVar[int]
    HIGHER_IS_BETTER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    step: int
    train_loss: float
    val_metric: float
    higher_is_better: bool
    layers: _containers.RepeatedCompositeFieldContainer[_health_pb2.LayerHealthReport]
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_metric: _Optional[float] = ..., higher_is_better: _Optional[bool] = ..., layers: _Optional[_Iterable[_Union[_health_pb2.LayerHealthReport, _Mapping]]] = ...) -> None: ...

class AdaptationSignal(_message.Message):
    __slots__ = ("commands", "rationale")
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    commands: _containers.RepeatedCompositeFieldContainer[_commands_pb2.LifecycleCommand]
    rationale: str
    def __init__(self, commands: _Optional[_Iterable[_Union[_commands_pb2.LifecycleCommand, _Mapping]]] = ..., rationale: _Optional[str] = ...) -> None: ...
