from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecallMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECALL_MODE_UNSPECIFIED: _ClassVar[RecallMode]
    RECALL_MODE_DENSE: _ClassVar[RecallMode]
    RECALL_MODE_LEXICAL: _ClassVar[RecallMode]
    RECALL_MODE_HYBRID: _ClassVar[RecallMode]
RECALL_MODE_UNSPECIFIED: RecallMode
RECALL_MODE_DENSE: RecallMode
RECALL_MODE_LEXICAL: RecallMode
RECALL_MODE_HYBRID: RecallMode

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limit(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: int
    def __init__(self, name: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...

class Cost(_message.Message):
    __slots__ = ("queue_ms", "service_ms", "ms_per_item")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_MS_FIELD_NUMBER: _ClassVar[int]
    MS_PER_ITEM_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    service_ms: float
    ms_per_item: float
    def __init__(self, queue_ms: _Optional[float] = ..., service_ms: _Optional[float] = ..., ms_per_item: _Optional[float] = ...) -> None: ...

class MetadataValue(_message.Message):
    __slots__ = ("string_value", "number_value", "bool_value", "string_list")
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    NUMBER_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_LIST_FIELD_NUMBER: _ClassVar[int]
    string_value: str
    number_value: float
    bool_value: bool
    string_list: StringList
    def __init__(self, string_value: _Optional[str] = ..., number_value: _Optional[float] = ..., bool_value: _Optional[bool] = ..., string_list: _Optional[_Union[StringList, _Mapping]] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("clauses",)
    CLAUSES_FIELD_NUMBER: _ClassVar[int]
    clauses: _containers.RepeatedCompositeFieldContainer[FilterClause]
    def __init__(self, clauses: _Optional[_Iterable[_Union[FilterClause, _Mapping]]] = ...) -> None: ...

class FilterClause(_message.Message):
    __slots__ = ("key", "equals", "any_of", "range")
    KEY_FIELD_NUMBER: _ClassVar[int]
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    key: str
    equals: MetadataValue
    any_of: ValueList
    range: NumberRange
    def __init__(self, key: _Optional[str] = ..., equals: _Optional[_Union[MetadataValue, _Mapping]] = ..., any_of: _Optional[_Union[ValueList, _Mapping]] = ..., range: _Optional[_Union[NumberRange, _Mapping]] = ...) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[MetadataValue]
    def __init__(self, values: _Optional[_Iterable[_Union[MetadataValue, _Mapping]]] = ...) -> None: ...

class NumberRange(_message.Message):
    __slots__ = ("gte", "gt", "lte", "lt")
    GTE_FIELD_NUMBER: _ClassVar[int]
    GT_FIELD_NUMBER: _ClassVar[int]
    LTE_FIELD_NUMBER: _ClassVar[int]
    LT_FIELD_NUMBER: _ClassVar[int]
    gte: float
    gt: float
    lte: float
    lt: float
    def __init__(self, gte: _Optional[float] = ..., gt: _Optional[float] = ..., lte: _Optional[float] = ..., lt: _Optional[float] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("id", "title", "text", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MetadataValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MetadataValue, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    text: str
    metadata: _containers.MessageMap[str, MetadataValue]
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Mapping[str, MetadataValue]] = ...) -> None: ...

class WriteVersion(_message.Message):
    __slots__ = ("clock", "writer")
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    WRITER_FIELD_NUMBER: _ClassVar[int]
    clock: int
    writer: str
    def __init__(self, clock: _Optional[int] = ..., writer: _Optional[str] = ...) -> None: ...

class ShardAck(_message.Message):
    __slots__ = ("shard", "documents", "acknowledged", "replicas")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    shard: int
    documents: int
    acknowledged: int
    replicas: int
    def __init__(self, shard: _Optional[int] = ..., documents: _Optional[int] = ..., acknowledged: _Optional[int] = ..., replicas: _Optional[int] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("documents", "request_id", "version")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    request_id: str
    version: WriteVersion
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., request_id: _Optional[str] = ..., version: _Optional[_Union[WriteVersion, _Mapping]] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("upserted", "doc_count", "timings_ms", "version", "shards", "request_id", "superseded", "newest_version")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    DOC_COUNT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_FIELD_NUMBER: _ClassVar[int]
    NEWEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    doc_count: int
    timings_ms: _containers.ScalarMap[str, float]
    version: WriteVersion
    shards: _containers.RepeatedCompositeFieldContainer[ShardAck]
    request_id: str
    superseded: int
    newest_version: WriteVersion
    def __init__(self, upserted: _Optional[int] = ..., doc_count: _Optional[int] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., version: _Optional[_Union[WriteVersion, _Mapping]] = ..., shards: _Optional[_Iterable[_Union[ShardAck, _Mapping]]] = ..., request_id: _Optional[str] = ..., superseded: _Optional[int] = ..., newest_version: _Optional[_Union[WriteVersion, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("ids", "request_id", "version")
    IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    version: WriteVersion
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., version: _Optional[_Union[WriteVersion, _Mapping]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "doc_count", "timings_ms", "version", "shards", "request_id", "superseded", "newest_version")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DELETED_FIELD_NUMBER: _ClassVar[int]
    DOC_COUNT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_FIELD_NUMBER: _ClassVar[int]
    NEWEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    doc_count: int
    timings_ms: _containers.ScalarMap[str, float]
    version: WriteVersion
    shards: _containers.RepeatedCompositeFieldContainer[ShardAck]
    request_id: str
    superseded: int
    newest_version: WriteVersion
    def __init__(self, deleted: _Optional[int] = ..., doc_count: _Optional[int] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., version: _Optional[_Union[WriteVersion, _Mapping]] = ..., shards: _Optional[_Iterable[_Union[ShardAck, _Mapping]]] = ..., request_id: _Optional[str] = ..., superseded: _Optional[int] = ..., newest_version: _Optional[_Union[WriteVersion, _Mapping]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("documents", "missing")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...
