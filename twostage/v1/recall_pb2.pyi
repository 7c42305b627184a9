from twostage.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HybridFusion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HYBRID_FUSION_UNSPECIFIED: _ClassVar[HybridFusion]
    HYBRID_FUSION_ZSCORE: _ClassVar[HybridFusion]
    HYBRID_FUSION_RRF: _ClassVar[HybridFusion]
HYBRID_FUSION_UNSPECIFIED: HybridFusion
HYBRID_FUSION_ZSCORE: HybridFusion
HYBRID_FUSION_RRF: HybridFusion

class RecallSearchRequest(_message.Message):
    __slots__ = ("query", "k", "request_id", "mode", "filter", "prf_depth", "prf_weight", "query_vector", "feedback_vector", "return_vectors", "trace_unsampled")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PRF_DEPTH_FIELD_NUMBER: _ClassVar[int]
    PRF_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    QUERY_VECTOR_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_VECTOR_FIELD_NUMBER: _ClassVar[int]
    RETURN_VECTORS_FIELD_NUMBER: _ClassVar[int]
    TRACE_UNSAMPLED_FIELD_NUMBER: _ClassVar[int]
    query: str
    k: int
    request_id: str
    mode: _common_pb2.RecallMode
    filter: _common_pb2.Filter
    prf_depth: int
    prf_weight: float
    query_vector: bytes
    feedback_vector: bytes
    return_vectors: int
    trace_unsampled: bool
    def __init__(self, query: _Optional[str] = ..., k: _Optional[int] = ..., request_id: _Optional[str] = ..., mode: _Optional[_Union[_common_pb2.RecallMode, str]] = ..., filter: _Optional[_Union[_common_pb2.Filter, _Mapping]] = ..., prf_depth: _Optional[int] = ..., prf_weight: _Optional[float] = ..., query_vector: _Optional[bytes] = ..., feedback_vector: _Optional[bytes] = ..., return_vectors: _Optional[int] = ..., trace_unsampled: _Optional[bool] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("id", "title", "text", "score", "metadata", "dense_score", "lexical_score", "vector", "prf_dense_score")
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
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DENSE_SCORE_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    PRF_DENSE_SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    text: str
    score: float
    metadata: _containers.MessageMap[str, _common_pb2.MetadataValue]
    dense_score: float
    lexical_score: float
    vector: bytes
    prf_dense_score: float
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., text: _Optional[str] = ..., score: _Optional[float] = ..., metadata: _Optional[_Mapping[str, _common_pb2.MetadataValue]] = ..., dense_score: _Optional[float] = ..., lexical_score: _Optional[float] = ..., vector: _Optional[bytes] = ..., prf_dense_score: _Optional[float] = ...) -> None: ...

class RecallSearchResponse(_message.Message):
    __slots__ = ("candidates", "timings_ms", "mode", "calibration", "query_vector", "prf_hits", "prf_skipped", "cost")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    QUERY_VECTOR_FIELD_NUMBER: _ClassVar[int]
    PRF_HITS_FIELD_NUMBER: _ClassVar[int]
    PRF_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    timings_ms: _containers.ScalarMap[str, float]
    mode: _common_pb2.RecallMode
    calibration: ScoreCalibration
    query_vector: bytes
    prf_hits: int
    prf_skipped: str
    cost: _common_pb2.Cost
    def __init__(self, candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., mode: _Optional[_Union[_common_pb2.RecallMode, str]] = ..., calibration: _Optional[_Union[ScoreCalibration, _Mapping]] = ..., query_vector: _Optional[bytes] = ..., prf_hits: _Optional[int] = ..., prf_skipped: _Optional[str] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ...) -> None: ...

class ScoreCalibration(_message.Message):
    __slots__ = ("scale", "center", "lexical_scale", "lexical_center", "pseudo_queries", "doc_count")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    CENTER_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_SCALE_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_CENTER_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_QUERIES_FIELD_NUMBER: _ClassVar[int]
    DOC_COUNT_FIELD_NUMBER: _ClassVar[int]
    scale: float
    center: float
    lexical_scale: float
    lexical_center: float
    pseudo_queries: int
    doc_count: int
    def __init__(self, scale: _Optional[float] = ..., center: _Optional[float] = ..., lexical_scale: _Optional[float] = ..., lexical_center: _Optional[float] = ..., pseudo_queries: _Optional[int] = ..., doc_count: _Optional[int] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("texts", "is_query", "model", "refuse_truncation", "trace_unsampled")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    IS_QUERY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REFUSE_TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    TRACE_UNSAMPLED_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    is_query: bool
    model: str
    refuse_truncation: bool
    trace_unsampled: bool
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., is_query: _Optional[bool] = ..., model: _Optional[str] = ..., refuse_truncation: _Optional[bool] = ..., trace_unsampled: _Optional[bool] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "dims", "timings_ms", "tokens")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dims: int
    timings_ms: _containers.ScalarMap[str, float]
    tokens: int
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dims: _Optional[int] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., tokens: _Optional[int] = ...) -> None: ...

class RecallInfo(_message.Message):
    __slots__ = ("version", "model", "dims", "doc_count", "execution_provider", "limits", "shard", "shards", "read_only", "default_mode", "hybrid_fusion", "hybrid_dense_weight", "lexical", "calibration", "prf_depth", "prf_weight", "execution_plan", "embedding_graph", "index_embedding_graph")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    DOC_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODE_FIELD_NUMBER: _ClassVar[int]
    HYBRID_FUSION_FIELD_NUMBER: _ClassVar[int]
    HYBRID_DENSE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    PRF_DEPTH_FIELD_NUMBER: _ClassVar[int]
    PRF_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PLAN_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_GRAPH_FIELD_NUMBER: _ClassVar[int]
    INDEX_EMBEDDING_GRAPH_FIELD_NUMBER: _ClassVar[int]
    version: str
    model: str
    dims: int
    doc_count: int
    execution_provider: str
    limits: _containers.RepeatedCompositeFieldContainer[_common_pb2.Limit]
    shard: int
    shards: int
    read_only: bool
    default_mode: _common_pb2.RecallMode
    hybrid_fusion: HybridFusion
    hybrid_dense_weight: float
    lexical: bool
    calibration: ScoreCalibration
    prf_depth: int
    prf_weight: float
    execution_plan: str
    embedding_graph: str
    index_embedding_graph: str
    def __init__(self, version: _Optional[str] = ..., model: _Optional[str] = ..., dims: _Optional[int] = ..., doc_count: _Optional[int] = ..., execution_provider: _Optional[str] = ..., limits: _Optional[_Iterable[_Union[_common_pb2.Limit, _Mapping]]] = ..., shard: _Optional[int] = ..., shards: _Optional[int] = ..., read_only: _Optional[bool] = ..., default_mode: _Optional[_Union[_common_pb2.RecallMode, str]] = ..., hybrid_fusion: _Optional[_Union[HybridFusion, str]] = ..., hybrid_dense_weight: _Optional[float] = ..., lexical: _Optional[bool] = ..., calibration: _Optional[_Union[ScoreCalibration, _Mapping]] = ..., prf_depth: _Optional[int] = ..., prf_weight: _Optional[float] = ..., execution_plan: _Optional[str] = ..., embedding_graph: _Optional[str] = ..., index_embedding_graph: _Optional[str] = ...) -> None: ...

class ChangesRequest(_message.Message):
    __slots__ = ("snapshot_version", "after_seq", "limit", "ids", "after_key")
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    AFTER_KEY_FIELD_NUMBER: _ClassVar[int]
    snapshot_version: str
    after_seq: int
    limit: int
    ids: _containers.RepeatedScalarFieldContainer[str]
    after_key: int
    def __init__(self, snapshot_version: _Optional[str] = ..., after_seq: _Optional[int] = ..., limit: _Optional[int] = ..., ids: _Optional[_Iterable[str]] = ..., after_key: _Optional[int] = ...) -> None: ...

class DocumentChange(_message.Message):
    __slots__ = ("document", "deleted", "vector", "seq", "version", "key")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    document: _common_pb2.Document
    deleted: bool
    vector: bytes
    seq: int
    version: _common_pb2.WriteVersion
    key: int
    def __init__(self, document: _Optional[_Union[_common_pb2.Document, _Mapping]] = ..., deleted: _Optional[bool] = ..., vector: _Optional[bytes] = ..., seq: _Optional[int] = ..., version: _Optional[_Union[_common_pb2.WriteVersion, _Mapping]] = ..., key: _Optional[int] = ...) -> None: ...

class ChangesResponse(_message.Message):
    __slots__ = ("changes", "replica_id", "snapshot_version", "more")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[DocumentChange]
    replica_id: str
    snapshot_version: str
    more: bool
    def __init__(self, changes: _Optional[_Iterable[_Union[DocumentChange, _Mapping]]] = ..., replica_id: _Optional[str] = ..., snapshot_version: _Optional[str] = ..., more: _Optional[bool] = ...) -> None: ...

class DigestRequest(_message.Message):
    __slots__ = ("snapshot_version", "below_clock")
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BELOW_CLOCK_FIELD_NUMBER: _ClassVar[int]
    snapshot_version: str
    below_clock: int
    def __init__(self, snapshot_version: _Optional[str] = ..., below_clock: _Optional[int] = ...) -> None: ...

class BucketDigest(_message.Message):
    __slots__ = ("bucket", "count", "hash")
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    bucket: int
    count: int
    hash: int
    def __init__(self, bucket: _Optional[int] = ..., count: _Optional[int] = ..., hash: _Optional[int] = ...) -> None: ...

class DigestResponse(_message.Message):
    __slots__ = ("replica_id", "snapshot_version", "buckets", "digests", "purge_horizon")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    PURGE_HORIZON_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    snapshot_version: str
    buckets: int
    digests: _containers.RepeatedCompositeFieldContainer[BucketDigest]
    purge_horizon: int
    def __init__(self, replica_id: _Optional[str] = ..., snapshot_version: _Optional[str] = ..., buckets: _Optional[int] = ..., digests: _Optional[_Iterable[_Union[BucketDigest, _Mapping]]] = ..., purge_horizon: _Optional[int] = ...) -> None: ...

class VersionsRequest(_message.Message):
    __slots__ = ("snapshot_version", "buckets")
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    snapshot_version: str
    buckets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, snapshot_version: _Optional[str] = ..., buckets: _Optional[_Iterable[int]] = ...) -> None: ...

class DocumentVersion(_message.Message):
    __slots__ = ("id", "version", "deleted")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: _common_pb2.WriteVersion
    deleted: bool
    def __init__(self, id: _Optional[str] = ..., version: _Optional[_Union[_common_pb2.WriteVersion, _Mapping]] = ..., deleted: _Optional[bool] = ...) -> None: ...

class VersionsResponse(_message.Message):
    __slots__ = ("replica_id", "versions", "snapshot_version")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    versions: _containers.RepeatedCompositeFieldContainer[DocumentVersion]
    snapshot_version: str
    def __init__(self, replica_id: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[DocumentVersion, _Mapping]]] = ..., snapshot_version: _Optional[str] = ...) -> None: ...
