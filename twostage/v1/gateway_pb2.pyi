from twostage.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FusionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUSION_METHOD_UNSPECIFIED: _ClassVar[FusionMethod]
    FUSION_NONE: _ClassVar[FusionMethod]
    FUSION_LINEAR: _ClassVar[FusionMethod]
    FUSION_RRF: _ClassVar[FusionMethod]
    FUSION_CALIBRATED: _ClassVar[FusionMethod]

class DegradationCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEGRADATION_CODE_UNSPECIFIED: _ClassVar[DegradationCode]
    RERANK_PARTIAL: _ClassVar[DegradationCode]
    RERANK_SKIPPED: _ClassVar[DegradationCode]
    RERANK_TIMEOUT: _ClassVar[DegradationCode]
    RERANK_OVERLOADED: _ClassVar[DegradationCode]
    RERANK_UNAVAILABLE: _ClassVar[DegradationCode]
    RECALL_PARTIAL: _ClassVar[DegradationCode]
    QUERY_TRUNCATED: _ClassVar[DegradationCode]
    PRF_SKIPPED: _ClassVar[DegradationCode]
FUSION_METHOD_UNSPECIFIED: FusionMethod
FUSION_NONE: FusionMethod
FUSION_LINEAR: FusionMethod
FUSION_RRF: FusionMethod
FUSION_CALIBRATED: FusionMethod
DEGRADATION_CODE_UNSPECIFIED: DegradationCode
RERANK_PARTIAL: DegradationCode
RERANK_SKIPPED: DegradationCode
RERANK_TIMEOUT: DegradationCode
RERANK_OVERLOADED: DegradationCode
RERANK_UNAVAILABLE: DegradationCode
RECALL_PARTIAL: DegradationCode
QUERY_TRUNCATED: DegradationCode
PRF_SKIPPED: DegradationCode

class SearchRequest(_message.Message):
    __slots__ = ("query", "top_k", "recall_k", "budget_ms", "request_id", "fusion", "fusion_alpha", "skip_rerank", "score_threshold", "recall_mode", "filter", "prf_depth", "prf_weight")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RECALL_K_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    FUSION_ALPHA_FIELD_NUMBER: _ClassVar[int]
    SKIP_RERANK_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    RECALL_MODE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PRF_DEPTH_FIELD_NUMBER: _ClassVar[int]
    PRF_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    query: str
    top_k: int
    recall_k: int
    budget_ms: int
    request_id: str
    fusion: FusionMethod
    fusion_alpha: float
    skip_rerank: bool
    score_threshold: float
    recall_mode: _common_pb2.RecallMode
    filter: _common_pb2.Filter
    prf_depth: int
    prf_weight: float
    def __init__(self, query: _Optional[str] = ..., top_k: _Optional[int] = ..., recall_k: _Optional[int] = ..., budget_ms: _Optional[int] = ..., request_id: _Optional[str] = ..., fusion: _Optional[_Union[FusionMethod, str]] = ..., fusion_alpha: _Optional[float] = ..., skip_rerank: _Optional[bool] = ..., score_threshold: _Optional[float] = ..., recall_mode: _Optional[_Union[_common_pb2.RecallMode, str]] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ..., prf_depth: _Optional[int] = ..., prf_weight: _Optional[float] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "title", "text", "score", "rerank_score", "recall_rank", "recall_score", "metadata", "relevance", "dense_score", "lexical_score")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.MetadataValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.MetadataValue, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RERANK_SCORE_FIELD_NUMBER: _ClassVar[int]
    RECALL_RANK_FIELD_NUMBER: _ClassVar[int]
    RECALL_SCORE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    DENSE_SCORE_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    text: str
    score: float
    rerank_score: float
    recall_rank: int
    recall_score: float
    metadata: _containers.MessageMap[str, _common_pb2.MetadataValue]
    relevance: float
    dense_score: float
    lexical_score: float
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., text: _Optional[str] = ..., score: _Optional[float] = ..., rerank_score: _Optional[float] = ..., recall_rank: _Optional[int] = ..., recall_score: _Optional[float] = ..., metadata: _Optional[_Mapping[str, _common_pb2.MetadataValue]] = ..., relevance: _Optional[float] = ..., dense_score: _Optional[float] = ..., lexical_score: _Optional[float] = ...) -> None: ...

class Degradation(_message.Message):
    __slots__ = ("code", "detail")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    code: DegradationCode
    detail: str
    def __init__(self, code: _Optional[_Union[DegradationCode, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "degraded", "degraded_reason", "degradations", "timings_ms", "candidates", "reranked", "request_id", "rerank_cached")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    HITS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASON_FIELD_NUMBER: _ClassVar[int]
    DEGRADATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    RERANKED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RERANK_CACHED_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    degraded: bool
    degraded_reason: str
    degradations: _containers.RepeatedCompositeFieldContainer[Degradation]
    timings_ms: _containers.ScalarMap[str, float]
    candidates: int
    reranked: int
    request_id: str
    rerank_cached: int
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., degraded: _Optional[bool] = ..., degraded_reason: _Optional[str] = ..., degradations: _Optional[_Iterable[_Union[Degradation, _Mapping]]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., candidates: _Optional[int] = ..., reranked: _Optional[int] = ..., request_id: _Optional[str] = ..., rerank_cached: _Optional[int] = ...) -> None: ...

class GatewayInfo(_message.Message):
    __slots__ = ("version", "recall_targets", "rerank_targets", "default_budget_ms", "limits", "default_fusion", "default_fusion_alpha", "default_top_k", "default_recall_k", "calibration")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RECALL_TARGETS_FIELD_NUMBER: _ClassVar[int]
    RERANK_TARGETS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FUSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FUSION_ALPHA_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RECALL_K_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    version: str
    recall_targets: _containers.RepeatedScalarFieldContainer[str]
    rerank_targets: _containers.RepeatedScalarFieldContainer[str]
    default_budget_ms: int
    limits: _containers.RepeatedCompositeFieldContainer[_common_pb2.Limit]
    default_fusion: FusionMethod
    default_fusion_alpha: float
    default_top_k: int
    default_recall_k: int
    calibration: FusionCalibration
    def __init__(self, version: _Optional[str] = ..., recall_targets: _Optional[_Iterable[str]] = ..., rerank_targets: _Optional[_Iterable[str]] = ..., default_budget_ms: _Optional[int] = ..., limits: _Optional[_Iterable[_Union[_common_pb2.Limit, _Mapping]]] = ..., default_fusion: _Optional[_Union[FusionMethod, str]] = ..., default_fusion_alpha: _Optional[float] = ..., default_top_k: _Optional[int] = ..., default_recall_k: _Optional[int] = ..., calibration: _Optional[_Union[FusionCalibration, _Mapping]] = ...) -> None: ...

class FusionCalibration(_message.Message):
    __slots__ = ("scale", "center", "lexical_scale", "lexical_center")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    CENTER_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_SCALE_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_CENTER_FIELD_NUMBER: _ClassVar[int]
    scale: float
    center: float
    lexical_scale: float
    lexical_center: float
    def __init__(self, scale: _Optional[float] = ..., center: _Optional[float] = ..., lexical_scale: _Optional[float] = ..., lexical_center: _Optional[float] = ...) -> None: ...

class RerankTextsRequest(_message.Message):
    __slots__ = ("query", "documents", "top_n", "budget_ms", "request_id", "model")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    query: str
    documents: _containers.RepeatedScalarFieldContainer[str]
    top_n: int
    budget_ms: int
    request_id: str
    model: str
    def __init__(self, query: _Optional[str] = ..., documents: _Optional[_Iterable[str]] = ..., top_n: _Optional[int] = ..., budget_ms: _Optional[int] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class RankedText(_message.Message):
    __slots__ = ("index", "score", "relevance")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    relevance: float
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., relevance: _Optional[float] = ...) -> None: ...

class RerankTextsResponse(_message.Message):
    __slots__ = ("results", "degraded", "degraded_reason", "degradations", "timings_ms", "scored", "cached", "request_id", "model", "tokens")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASON_FIELD_NUMBER: _ClassVar[int]
    DEGRADATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RankedText]
    degraded: bool
    degraded_reason: str
    degradations: _containers.RepeatedCompositeFieldContainer[Degradation]
    timings_ms: _containers.ScalarMap[str, float]
    scored: int
    cached: int
    request_id: str
    model: str
    tokens: int
    def __init__(self, results: _Optional[_Iterable[_Union[RankedText, _Mapping]]] = ..., degraded: _Optional[bool] = ..., degraded_reason: _Optional[str] = ..., degradations: _Optional[_Iterable[_Union[Degradation, _Mapping]]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., scored: _Optional[int] = ..., cached: _Optional[int] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class EmbedTextsRequest(_message.Message):
    __slots__ = ("texts", "is_query", "model", "dimensions", "normalize", "budget_ms", "request_id")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    IS_QUERY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    is_query: bool
    model: str
    dimensions: int
    normalize: bool
    budget_ms: int
    request_id: str
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., is_query: _Optional[bool] = ..., model: _Optional[str] = ..., dimensions: _Optional[int] = ..., normalize: _Optional[bool] = ..., budget_ms: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedTextsResponse(_message.Message):
    __slots__ = ("embeddings", "dims", "model", "tokens", "timings_ms", "request_id")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Vector]
    dims: int
    model: str
    tokens: int
    timings_ms: _containers.ScalarMap[str, float]
    request_id: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., dims: _Optional[int] = ..., model: _Optional[str] = ..., tokens: _Optional[int] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., request_id: _Optional[str] = ...) -> None: ...
