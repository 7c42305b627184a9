from twostage.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RerankRequest(_message.Message):
    __slots__ = ("query", "documents", "top_n", "model", "request_id", "bypass_cache", "allow_partial", "refuse_truncation", "trace_unsampled")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BYPASS_CACHE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    REFUSE_TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    TRACE_UNSAMPLED_FIELD_NUMBER: _ClassVar[int]
    query: str
    documents: _containers.RepeatedScalarFieldContainer[str]
    top_n: int
    model: str
    request_id: str
    bypass_cache: bool
    allow_partial: bool
    refuse_truncation: bool
    trace_unsampled: bool
    def __init__(self, query: _Optional[str] = ..., documents: _Optional[_Iterable[str]] = ..., top_n: _Optional[int] = ..., model: _Optional[str] = ..., request_id: _Optional[str] = ..., bypass_cache: _Optional[bool] = ..., allow_partial: _Optional[bool] = ..., refuse_truncation: _Optional[bool] = ..., trace_unsampled: _Optional[bool] = ...) -> None: ...

class RerankResult(_message.Message):
    __slots__ = ("index", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("results", "timings_ms", "tokens", "queue_items", "query_truncated", "cached", "unscored", "cost_ratio", "cost")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    QUERY_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    UNSCORED_FIELD_NUMBER: _ClassVar[int]
    COST_RATIO_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RerankResult]
    timings_ms: _containers.ScalarMap[str, float]
    tokens: int
    queue_items: int
    query_truncated: bool
    cached: int
    unscored: int
    cost_ratio: float
    cost: _common_pb2.Cost
    def __init__(self, results: _Optional[_Iterable[_Union[RerankResult, _Mapping]]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., tokens: _Optional[int] = ..., queue_items: _Optional[int] = ..., query_truncated: _Optional[bool] = ..., cached: _Optional[int] = ..., unscored: _Optional[int] = ..., cost_ratio: _Optional[float] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ...) -> None: ...

class RerankInfo(_message.Message):
    __slots__ = ("version", "model", "max_length", "execution_provider", "limits", "ms_per_pair", "pair_fixed_ms", "pair_ms_per_token", "cost_ratio", "chars_per_token", "execution_plan")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MS_PER_PAIR_FIELD_NUMBER: _ClassVar[int]
    PAIR_FIXED_MS_FIELD_NUMBER: _ClassVar[int]
    PAIR_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    COST_RATIO_FIELD_NUMBER: _ClassVar[int]
    CHARS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PLAN_FIELD_NUMBER: _ClassVar[int]
    version: str
    model: str
    max_length: int
    execution_provider: str
    limits: _containers.RepeatedCompositeFieldContainer[_common_pb2.Limit]
    ms_per_pair: float
    pair_fixed_ms: float
    pair_ms_per_token: float
    cost_ratio: float
    chars_per_token: float
    execution_plan: str
    def __init__(self, version: _Optional[str] = ..., model: _Optional[str] = ..., max_length: _Optional[int] = ..., execution_provider: _Optional[str] = ..., limits: _Optional[_Iterable[_Union[_common_pb2.Limit, _Mapping]]] = ..., ms_per_pair: _Optional[float] = ..., pair_fixed_ms: _Optional[float] = ..., pair_ms_per_token: _Optional[float] = ..., cost_ratio: _Optional[float] = ..., chars_per_token: _Optional[float] = ..., execution_plan: _Optional[str] = ...) -> None: ...
