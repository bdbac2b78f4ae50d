from oona.proto.kasmina.blueprints.v1 import blueprint_pb2 as _blueprint_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListBlueprintsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBlueprintsResponse(_message.Message):
    __slots__ = ("blueprints",)
    BLUEPRINTS_FIELD_NUMBER: _ClassVar[int]
    blueprints: _containers.RepeatedCompositeFieldContainer[_blueprint_pb2.BlueprintSpec]
    def __init__(self, blueprints: _Optional[_Iterable[_Union[_blueprint_pb2.BlueprintSpec, _Mapping]]] = ...) -> None: ...

class BlueprintStatistics(_message.Message):
    __slots__ = ("blueprint_id", "blueprint_name", "reports", "fossilized", "culled", "rolled_back", "cancelled", "mean_contribution", "mean_metric_gain", "mean_parameters_added")
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_NAME_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    FOSSILIZED_FIELD_NUMBER: _ClassVar[int]
    CULLED_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    MEAN_CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    MEAN_METRIC_GAIN_FIELD_NUMBER: _ClassVar[int]
    MEAN_PARAMETERS_ADDED_FIELD_NUMBER: _ClassVar[int]
    blueprint_id: int
    blueprint_name: str
    reports: int
    fossilized: int
    culled: int
    rolled_back: int
    cancelled: int
    mean_contribution: float
    mean_metric_gain: float
    mean_parameters_added: float
    def __init__(self, blueprint_id: _Optional[int] = ..., blueprint_name: _Optional[str] = ..., reports: _Optional[int] = ..., fossilized: _Optional[int] = ..., culled: _Optional[int] = ..., rolled_back: _Optional[int] = ..., cancelled: _Optional[int] = ..., mean_contribution: _Optional[float] = ..., mean_metric_gain: _Optional[float] = ..., mean_parameters_added: _Optional[float] = ...) -> None: ...

class GetBlueprintStatisticsRequest(_message.Message):
    __slots__ = ("blueprint_ids",)
    BLUEPRINT_IDS_FIELD_NUMBER: _ClassVar[int]
    blueprint_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, blueprint_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GetBlueprintStatisticsResponse(_message.Message):
    __slots__ = ("statistics",)
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    statistics: _containers.RepeatedCompositeFieldContainer[BlueprintStatistics]
    def __init__(self, statistics: _Optional[_Iterable[_Union[BlueprintStatistics, _Mapping]]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("job_id", "layer_id", "chunk_size", "parameter_budget", "exclude_blueprint_ids", "limit")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BUDGET_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_BLUEPRINT_IDS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    layer_id: str
    chunk_size: int
    parameter_budget: int
    exclude_blueprint_ids: _containers.RepeatedScalarFieldContainer[int]
    limit: int
    def __init__(self, job_id: _Optional[str] = ..., layer_id: _Optional[str] = ..., chunk_size: _Optional[int] = ..., parameter_budget: _Optional[int] = ..., exclude_blueprint_ids: _Optional[_Iterable[int]] = ..., limit: _Optional[int] = ...) -> None: ...

class Recommendation(_message.Message):
    __slots__ = ("blueprint", "strategy_name", "score", "rationale")
    BLUEPRINT_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    blueprint: _blueprint_pb2.BlueprintSpec
    strategy_name: str
    score: float
    rationale: str
    def __init__(self, blueprint: _Optional[_Union[_blueprint_pb2.BlueprintSpec, _Mapping]] = ..., strategy_name: _Optional[str] = ..., score: _Optional[float] = ..., rationale: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("recommendations",)
    RECOMMENDATIONS_FIELD_NUMBER: _ClassVar[int]
    recommendations: _containers.RepeatedCompositeFieldContainer[Recommendation]
    def __init__(self, recommendations: _Optional[_Iterable[_Union[Recommendation, _Mapping]]] = ...) -> None: ...
