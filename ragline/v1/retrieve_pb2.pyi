from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_UNSPECIFIED: _ClassVar[Metric]
    METRIC_INNER_PRODUCT: _ClassVar[Metric]

class IndexKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INDEX_KIND_AUTO: _ClassVar[IndexKind]
    INDEX_KIND_FLAT: _ClassVar[IndexKind]
    INDEX_KIND_HNSW: _ClassVar[IndexKind]
    INDEX_KIND_IVF: _ClassVar[IndexKind]

class SearchMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEARCH_MODE_UNSPECIFIED: _ClassVar[SearchMode]
    SEARCH_MODE_DENSE: _ClassVar[SearchMode]
    SEARCH_MODE_SPARSE: _ClassVar[SearchMode]
    SEARCH_MODE_HYBRID: _ClassVar[SearchMode]
METRIC_UNSPECIFIED: Metric
METRIC_INNER_PRODUCT: Metric
INDEX_KIND_AUTO: IndexKind
INDEX_KIND_FLAT: IndexKind
INDEX_KIND_HNSW: IndexKind
INDEX_KIND_IVF: IndexKind
SEARCH_MODE_UNSPECIFIED: SearchMode
SEARCH_MODE_DENSE: SearchMode
SEARCH_MODE_SPARSE: SearchMode
SEARCH_MODE_HYBRID: SearchMode

class IndexPolicy(_message.Message):
    __slots__ = ("kind", "threshold", "hnsw_m", "ef_construction", "ivf_nlist")
    KIND_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    HNSW_M_FIELD_NUMBER: _ClassVar[int]
    EF_CONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    IVF_NLIST_FIELD_NUMBER: _ClassVar[int]
    kind: IndexKind
    threshold: int
    hnsw_m: int
    ef_construction: int
    ivf_nlist: int
    def __init__(self, kind: _Optional[_Union[IndexKind, str]] = ..., threshold: _Optional[int] = ..., hnsw_m: _Optional[int] = ..., ef_construction: _Optional[int] = ..., ivf_nlist: _Optional[int] = ...) -> None: ...

class Collection(_message.Message):
    __slots__ = ("name", "dimension", "metric", "index_type", "index_policy", "search_mode", "version", "last_write_unix_ms", "count", "documents")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_POLICY_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_WRITE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    dimension: int
    metric: Metric
    index_type: str
    index_policy: IndexPolicy
    search_mode: SearchMode
    version: int
    last_write_unix_ms: int
    count: int
    documents: int
    def __init__(self, name: _Optional[str] = ..., dimension: _Optional[int] = ..., metric: _Optional[_Union[Metric, str]] = ..., index_type: _Optional[str] = ..., index_policy: _Optional[_Union[IndexPolicy, _Mapping]] = ..., search_mode: _Optional[_Union[SearchMode, str]] = ..., version: _Optional[int] = ..., last_write_unix_ms: _Optional[int] = ..., count: _Optional[int] = ..., documents: _Optional[int] = ...) -> None: ...

class CreateCollectionRequest(_message.Message):
    __slots__ = ("name", "dimension", "metric", "exist_ok", "index_policy", "search_mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    EXIST_OK_FIELD_NUMBER: _ClassVar[int]
    INDEX_POLICY_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dimension: int
    metric: Metric
    exist_ok: bool
    index_policy: IndexPolicy
    search_mode: SearchMode
    def __init__(self, name: _Optional[str] = ..., dimension: _Optional[int] = ..., metric: _Optional[_Union[Metric, str]] = ..., exist_ok: _Optional[bool] = ..., index_policy: _Optional[_Union[IndexPolicy, _Mapping]] = ..., search_mode: _Optional[_Union[SearchMode, str]] = ...) -> None: ...

class ListCollectionsRequest(_message.Message):
    __slots__ = ("with_counts",)
    WITH_COUNTS_FIELD_NUMBER: _ClassVar[int]
    with_counts: bool
    def __init__(self, with_counts: _Optional[bool] = ...) -> None: ...

class ListCollectionsResponse(_message.Message):
    __slots__ = ("collections",)
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[Collection]
    def __init__(self, collections: _Optional[_Iterable[_Union[Collection, _Mapping]]] = ...) -> None: ...

class DeleteCollectionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteCollectionResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class Passage(_message.Message):
    __slots__ = ("id", "document_id", "chunk", "text", "metadata", "vector")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    document_id: str
    chunk: int
    text: str
    metadata: _containers.ScalarMap[str, str]
    vector: bytes
    def __init__(self, id: _Optional[str] = ..., document_id: _Optional[str] = ..., chunk: _Optional[int] = ..., text: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., vector: _Optional[bytes] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("document_id", "content_hash", "chunks", "updated_unix_ms", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    content_hash: str
    chunks: int
    updated_unix_ms: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, document_id: _Optional[str] = ..., content_hash: _Optional[str] = ..., chunks: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("collection", "passages", "documents")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PASSAGES_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    passages: _containers.RepeatedCompositeFieldContainer[Passage]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    def __init__(self, collection: _Optional[str] = ..., passages: _Optional[_Iterable[_Union[Passage, _Mapping]]] = ..., documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("upserted", "removed", "count")
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    removed: int
    count: int
    def __init__(self, upserted: _Optional[int] = ..., removed: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("collection", "ids", "document_ids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    document_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., document_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "count")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    count: int
    def __init__(self, deleted: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("collection", "vector", "top_k", "filter", "ef_search", "nprobe", "query_text", "mode")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    QUERY_TEXT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    vector: bytes
    top_k: int
    filter: Filter
    ef_search: int
    nprobe: int
    query_text: str
    mode: SearchMode
    def __init__(self, collection: _Optional[str] = ..., vector: _Optional[bytes] = ..., top_k: _Optional[int] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., ef_search: _Optional[int] = ..., nprobe: _Optional[int] = ..., query_text: _Optional[str] = ..., mode: _Optional[_Union[SearchMode, str]] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class FieldCondition(_message.Message):
    __slots__ = ("key", "equals", "any_of")
    KEY_FIELD_NUMBER: _ClassVar[int]
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    key: str
    equals: str
    any_of: StringList
    def __init__(self, key: _Optional[str] = ..., equals: _Optional[str] = ..., any_of: _Optional[_Union[StringList, _Mapping]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("must",)
    MUST_FIELD_NUMBER: _ClassVar[int]
    must: _containers.RepeatedCompositeFieldContainer[FieldCondition]
    def __init__(self, must: _Optional[_Iterable[_Union[FieldCondition, _Mapping]]] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "score", "text", "metadata", "document_id", "chunk", "rrf_score", "bm25_score")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RRF_SCORE_FIELD_NUMBER: _ClassVar[int]
    BM25_SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    text: str
    metadata: _containers.ScalarMap[str, str]
    document_id: str
    chunk: int
    rrf_score: float
    bm25_score: float
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., text: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., document_id: _Optional[str] = ..., chunk: _Optional[int] = ..., rrf_score: _Optional[float] = ..., bm25_score: _Optional[float] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "index_type", "strategy", "version")
    HITS_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    index_type: str
    strategy: str
    version: int
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., index_type: _Optional[str] = ..., strategy: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetDocumentsRequest(_message.Message):
    __slots__ = ("collection", "document_ids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    document_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., document_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetDocumentsResponse(_message.Message):
    __slots__ = ("documents",)
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ...) -> None: ...

class ListDocumentsRequest(_message.Message):
    __slots__ = ("collection", "limit", "after")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    collection: str
    limit: int
    after: str
    def __init__(self, collection: _Optional[str] = ..., limit: _Optional[int] = ..., after: _Optional[str] = ...) -> None: ...

class ListDocumentsResponse(_message.Message):
    __slots__ = ("documents", "next_after")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    next_after: str
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., next_after: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class CollectionStats(_message.Message):
    __slots__ = ("name", "count", "dimension", "index_type", "metric", "documents", "last_write_unix_ms", "indexed", "index_policy", "version", "indexed_version", "rebuilding")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    LAST_WRITE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    INDEXED_FIELD_NUMBER: _ClassVar[int]
    INDEX_POLICY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEXED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REBUILDING_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    dimension: int
    index_type: str
    metric: Metric
    documents: int
    last_write_unix_ms: int
    indexed: int
    index_policy: IndexPolicy
    version: int
    indexed_version: int
    rebuilding: bool
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ..., dimension: _Optional[int] = ..., index_type: _Optional[str] = ..., metric: _Optional[_Union[Metric, str]] = ..., documents: _Optional[int] = ..., last_write_unix_ms: _Optional[int] = ..., indexed: _Optional[int] = ..., index_policy: _Optional[_Union[IndexPolicy, _Mapping]] = ..., version: _Optional[int] = ..., indexed_version: _Optional[int] = ..., rebuilding: _Optional[bool] = ...) -> None: ...
