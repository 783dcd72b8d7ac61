import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecommendStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECOMMEND_STRATEGY_UNSPECIFIED: _ClassVar[RecommendStrategy]
    RECOMMEND_STRATEGY_AVERAGE_VECTOR: _ClassVar[RecommendStrategy]
    RECOMMEND_STRATEGY_BEST_SCORE: _ClassVar[RecommendStrategy]
RECOMMEND_STRATEGY_UNSPECIFIED: RecommendStrategy
RECOMMEND_STRATEGY_AVERAGE_VECTOR: RecommendStrategy
RECOMMEND_STRATEGY_BEST_SCORE: RecommendStrategy

class Vector(_message.Message):
    __slots__ = ("data", "dim")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dim: int
    def __init__(self, data: _Optional[bytes] = ..., dim: _Optional[int] = ...) -> None: ...

class Matrix(_message.Message):
    __slots__ = ("data", "rows", "dim")
    DATA_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    rows: int
    dim: int
    def __init__(self, data: _Optional[bytes] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("index", "code", "message")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    code: int
    message: str
    def __init__(self, index: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EmbedTextsRequest(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class EmbedTextsResponse(_message.Message):
    __slots__ = ("vectors", "errors")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    vectors: Matrix
    errors: _containers.RepeatedCompositeFieldContainer[ItemError]
    def __init__(self, vectors: _Optional[_Union[Matrix, _Mapping]] = ..., errors: _Optional[_Iterable[_Union[ItemError, _Mapping]]] = ...) -> None: ...

class EmbedImagesRequest(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class EmbedImagesResponse(_message.Message):
    __slots__ = ("vectors", "errors")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    vectors: Matrix
    errors: _containers.RepeatedCompositeFieldContainer[ItemError]
    def __init__(self, vectors: _Optional[_Union[Matrix, _Mapping]] = ..., errors: _Optional[_Iterable[_Union[ItemError, _Mapping]]] = ...) -> None: ...

class HnswConfig(_message.Message):
    __slots__ = ("m", "ef_construction")
    M_FIELD_NUMBER: _ClassVar[int]
    EF_CONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    m: int
    ef_construction: int
    def __init__(self, m: _Optional[int] = ..., ef_construction: _Optional[int] = ...) -> None: ...

class CollectionInfo(_message.Message):
    __slots__ = ("name", "count", "dim", "model_fingerprint", "hnsw", "created_at", "thumbnail_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HNSW_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    dim: int
    model_fingerprint: str
    hnsw: HnswConfig
    created_at: float
    thumbnail_size: int
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ..., dim: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., hnsw: _Optional[_Union[HnswConfig, _Mapping]] = ..., created_at: _Optional[float] = ..., thumbnail_size: _Optional[int] = ...) -> None: ...

class CreateCollectionRequest(_message.Message):
    __slots__ = ("name", "hnsw", "thumbnail_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HNSW_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    hnsw: HnswConfig
    thumbnail_size: int
    def __init__(self, name: _Optional[str] = ..., hnsw: _Optional[_Union[HnswConfig, _Mapping]] = ..., thumbnail_size: _Optional[int] = ...) -> None: ...

class CreateCollectionResponse(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: CollectionInfo
    def __init__(self, collection: _Optional[_Union[CollectionInfo, _Mapping]] = ...) -> None: ...

class ListCollectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCollectionsResponse(_message.Message):
    __slots__ = ("collections",)
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[CollectionInfo]
    def __init__(self, collections: _Optional[_Iterable[_Union[CollectionInfo, _Mapping]]] = ...) -> None: ...

class GetCollectionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetCollectionResponse(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: CollectionInfo
    def __init__(self, collection: _Optional[_Union[CollectionInfo, _Mapping]] = ...) -> None: ...

class DropCollectionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DropCollectionResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("id", "image", "text", "vector", "metadata")
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: bytes
    text: str
    vector: Vector
    metadata: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., image: _Optional[bytes] = ..., text: _Optional[str] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("collection", "items")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    items: _containers.RepeatedCompositeFieldContainer[Item]
    def __init__(self, collection: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ...) -> None: ...

class UpsertItemsResponse(_message.Message):
    __slots__ = ("upserted", "errors")
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    errors: _containers.RepeatedCompositeFieldContainer[ItemError]
    def __init__(self, upserted: _Optional[int] = ..., errors: _Optional[_Iterable[_Union[ItemError, _Mapping]]] = ...) -> None: ...

class StoredItem(_message.Message):
    __slots__ = ("id", "vector", "metadata", "thumbnail")
    ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    id: str
    vector: Vector
    metadata: _struct_pb2.Struct
    thumbnail: bytes
    def __init__(self, id: _Optional[str] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., thumbnail: _Optional[bytes] = ...) -> None: ...

class GetItemsRequest(_message.Message):
    __slots__ = ("collection", "ids", "include_vectors", "include_thumbnails")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_THUMBNAILS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    include_vectors: bool
    include_thumbnails: bool
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., include_vectors: _Optional[bool] = ..., include_thumbnails: _Optional[bool] = ...) -> None: ...

class GetItemsResponse(_message.Message):
    __slots__ = ("items", "missing_ids")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MISSING_IDS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StoredItem]
    missing_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[_Iterable[_Union[StoredItem, _Mapping]]] = ..., missing_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteItemsRequest(_message.Message):
    __slots__ = ("collection", "ids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteItemsResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class CountItemsRequest(_message.Message):
    __slots__ = ("collection", "filter")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    collection: str
    filter: Filter
    def __init__(self, collection: _Optional[str] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ...) -> None: ...

class CountItemsResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class ListItemsRequest(_message.Message):
    __slots__ = ("collection", "page_size", "page_token", "filter", "include_vectors", "include_thumbnails")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_THUMBNAILS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    page_size: int
    page_token: str
    filter: Filter
    include_vectors: bool
    include_thumbnails: bool
    def __init__(self, collection: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., include_vectors: _Optional[bool] = ..., include_thumbnails: _Optional[bool] = ...) -> None: ...

class ListItemsResponse(_message.Message):
    __slots__ = ("items", "next_page_token")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StoredItem]
    next_page_token: str
    def __init__(self, items: _Optional[_Iterable[_Union[StoredItem, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("field", "all_of", "any_of", "none_of")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    ALL_OF_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    NONE_OF_FIELD_NUMBER: _ClassVar[int]
    field: FieldFilter
    all_of: FilterList
    any_of: FilterList
    none_of: FilterList
    def __init__(self, field: _Optional[_Union[FieldFilter, _Mapping]] = ..., all_of: _Optional[_Union[FilterList, _Mapping]] = ..., any_of: _Optional[_Union[FilterList, _Mapping]] = ..., none_of: _Optional[_Union[FilterList, _Mapping]] = ...) -> None: ...

class FilterList(_message.Message):
    __slots__ = ("filters",)
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    filters: _containers.RepeatedCompositeFieldContainer[Filter]
    def __init__(self, filters: _Optional[_Iterable[_Union[Filter, _Mapping]]] = ...) -> None: ...

class FieldFilter(_message.Message):
    __slots__ = ("key", "equals", "one_of", "range", "time_range", "exists")
    KEY_FIELD_NUMBER: _ClassVar[int]
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    ONE_OF_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    TIME_RANGE_FIELD_NUMBER: _ClassVar[int]
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    key: str
    equals: _struct_pb2.Value
    one_of: ValueList
    range: NumberRange
    time_range: TimeRange
    exists: bool
    def __init__(self, key: _Optional[str] = ..., equals: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., one_of: _Optional[_Union[ValueList, _Mapping]] = ..., range: _Optional[_Union[NumberRange, _Mapping]] = ..., time_range: _Optional[_Union[TimeRange, _Mapping]] = ..., exists: _Optional[bool] = ...) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Value]
    def __init__(self, values: _Optional[_Iterable[_Union[_struct_pb2.Value, _Mapping]]] = ...) -> None: ...

class NumberRange(_message.Message):
    __slots__ = ("gt", "gte", "lt", "lte")
    GT_FIELD_NUMBER: _ClassVar[int]
    GTE_FIELD_NUMBER: _ClassVar[int]
    LT_FIELD_NUMBER: _ClassVar[int]
    LTE_FIELD_NUMBER: _ClassVar[int]
    gt: float
    gte: float
    lt: float
    lte: float
    def __init__(self, gt: _Optional[float] = ..., gte: _Optional[float] = ..., lt: _Optional[float] = ..., lte: _Optional[float] = ...) -> None: ...

class TimeRange(_message.Message):
    __slots__ = ("gt", "gte", "lt", "lte")
    GT_FIELD_NUMBER: _ClassVar[int]
    GTE_FIELD_NUMBER: _ClassVar[int]
    LT_FIELD_NUMBER: _ClassVar[int]
    LTE_FIELD_NUMBER: _ClassVar[int]
    gt: _timestamp_pb2.Timestamp
    gte: _timestamp_pb2.Timestamp
    lt: _timestamp_pb2.Timestamp
    lte: _timestamp_pb2.Timestamp
    def __init__(self, gt: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gte: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lt: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lte: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("collection", "text", "image", "vector", "id", "k", "ef", "include_vectors", "filter", "include_thumbnails")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EF_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_THUMBNAILS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    text: str
    image: bytes
    vector: Vector
    id: str
    k: int
    ef: int
    include_vectors: bool
    filter: Filter
    include_thumbnails: bool
    def __init__(self, collection: _Optional[str] = ..., text: _Optional[str] = ..., image: _Optional[bytes] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., id: _Optional[str] = ..., k: _Optional[int] = ..., ef: _Optional[int] = ..., include_vectors: _Optional[bool] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., include_thumbnails: _Optional[bool] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "score", "metadata", "vector", "thumbnail")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    metadata: _struct_pb2.Struct
    vector: Vector
    thumbnail: bytes
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., thumbnail: _Optional[bytes] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("model", "pretrained", "checkpoint", "random_weights", "dim", "device", "precision", "model_fingerprint", "version", "max_message_bytes", "max_k", "image_size", "precision_reason", "unavailable_collections", "backend", "backend_reason", "towers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRETRAINED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BACKEND_REASON_FIELD_NUMBER: _ClassVar[int]
    TOWERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    pretrained: str
    checkpoint: str
    random_weights: bool
    dim: int
    device: str
    precision: str
    model_fingerprint: str
    version: str
    max_message_bytes: int
    max_k: int
    image_size: int
    precision_reason: str
    unavailable_collections: _containers.RepeatedCompositeFieldContainer[UnavailableCollection]
    backend: str
    backend_reason: str
    towers: _containers.RepeatedCompositeFieldContainer[TowerTuning]
    def __init__(self, model: _Optional[str] = ..., pretrained: _Optional[str] = ..., checkpoint: _Optional[str] = ..., random_weights: _Optional[bool] = ..., dim: _Optional[int] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., version: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., max_k: _Optional[int] = ..., image_size: _Optional[int] = ..., precision_reason: _Optional[str] = ..., unavailable_collections: _Optional[_Iterable[_Union[UnavailableCollection, _Mapping]]] = ..., backend: _Optional[str] = ..., backend_reason: _Optional[str] = ..., towers: _Optional[_Iterable[_Union[TowerTuning, _Mapping]]] = ...) -> None: ...

class TowerTuning(_message.Message):
    __slots__ = ("tower", "batch_size", "inputs_per_second", "reason")
    TOWER_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    tower: str
    batch_size: int
    inputs_per_second: float
    reason: str
    def __init__(self, tower: _Optional[str] = ..., batch_size: _Optional[int] = ..., inputs_per_second: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class Example(_message.Message):
    __slots__ = ("id", "text", "image", "vector")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    image: bytes
    vector: Vector
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., image: _Optional[bytes] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("collection", "positives", "negatives", "strategy", "k", "filter", "ef", "include_vectors", "negative_weight")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    POSITIVES_FIELD_NUMBER: _ClassVar[int]
    NEGATIVES_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    EF_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    collection: str
    positives: _containers.RepeatedCompositeFieldContainer[Example]
    negatives: _containers.RepeatedCompositeFieldContainer[Example]
    strategy: RecommendStrategy
    k: int
    filter: Filter
    ef: int
    include_vectors: bool
    negative_weight: float
    def __init__(self, collection: _Optional[str] = ..., positives: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., negatives: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., strategy: _Optional[_Union[RecommendStrategy, str]] = ..., k: _Optional[int] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., ef: _Optional[int] = ..., include_vectors: _Optional[bool] = ..., negative_weight: _Optional[float] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ...) -> None: ...

class ClassifyInput(_message.Message):
    __slots__ = ("image", "id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    id: str
    def __init__(self, image: _Optional[bytes] = ..., id: _Optional[str] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("inputs", "collection", "labels", "templates", "top_n")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[ClassifyInput]
    collection: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    templates: _containers.RepeatedScalarFieldContainer[str]
    top_n: int
    def __init__(self, inputs: _Optional[_Iterable[_Union[ClassifyInput, _Mapping]]] = ..., collection: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., templates: _Optional[_Iterable[str]] = ..., top_n: _Optional[int] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "probability", "similarity")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    similarity: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ..., similarity: _Optional[float] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("index", "scores", "top")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    index: int
    scores: _containers.RepeatedCompositeFieldContainer[LabelScore]
    top: _containers.RepeatedCompositeFieldContainer[LabelScore]
    def __init__(self, index: _Optional[int] = ..., scores: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., top: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("results", "errors", "logit_scale")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    errors: _containers.RepeatedCompositeFieldContainer[ItemError]
    logit_scale: float
    def __init__(self, results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., errors: _Optional[_Iterable[_Union[ItemError, _Mapping]]] = ..., logit_scale: _Optional[float] = ...) -> None: ...

class FindDuplicatesRequest(_message.Message):
    __slots__ = ("collection", "filter", "threshold", "neighbors", "ef", "page_size", "page_token")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    EF_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    collection: str
    filter: Filter
    threshold: float
    neighbors: int
    ef: int
    page_size: int
    page_token: str
    def __init__(self, collection: _Optional[str] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., threshold: _Optional[float] = ..., neighbors: _Optional[int] = ..., ef: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class DuplicateMember(_message.Message):
    __slots__ = ("id", "score")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class DuplicateGroup(_message.Message):
    __slots__ = ("members", "min_similarity")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MIN_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[DuplicateMember]
    min_similarity: float
    def __init__(self, members: _Optional[_Iterable[_Union[DuplicateMember, _Mapping]]] = ..., min_similarity: _Optional[float] = ...) -> None: ...

class FindDuplicatesResponse(_message.Message):
    __slots__ = ("groups", "next_page_token", "total_groups", "items_compared")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_GROUPS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_COMPARED_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[DuplicateGroup]
    next_page_token: str
    total_groups: int
    items_compared: int
    def __init__(self, groups: _Optional[_Iterable[_Union[DuplicateGroup, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_groups: _Optional[int] = ..., items_compared: _Optional[int] = ...) -> None: ...

class ClusterRequest(_message.Message):
    __slots__ = ("collection", "filter", "n_clusters", "top_n", "seed", "metadata_key", "include_centroids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    N_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    METADATA_KEY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CENTROIDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    filter: Filter
    n_clusters: int
    top_n: int
    seed: int
    metadata_key: str
    include_centroids: bool
    def __init__(self, collection: _Optional[str] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., n_clusters: _Optional[int] = ..., top_n: _Optional[int] = ..., seed: _Optional[int] = ..., metadata_key: _Optional[str] = ..., include_centroids: _Optional[bool] = ...) -> None: ...

class ClusterGroup(_message.Message):
    __slots__ = ("cluster", "size", "central", "centroid")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CENTRAL_FIELD_NUMBER: _ClassVar[int]
    CENTROID_FIELD_NUMBER: _ClassVar[int]
    cluster: int
    size: int
    central: _containers.RepeatedCompositeFieldContainer[Hit]
    centroid: Vector
    def __init__(self, cluster: _Optional[int] = ..., size: _Optional[int] = ..., central: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., centroid: _Optional[_Union[Vector, _Mapping]] = ...) -> None: ...

class ClusterResponse(_message.Message):
    __slots__ = ("clusters", "items_clustered", "items_labelled", "inertia")
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_CLUSTERED_FIELD_NUMBER: _ClassVar[int]
    ITEMS_LABELLED_FIELD_NUMBER: _ClassVar[int]
    INERTIA_FIELD_NUMBER: _ClassVar[int]
    clusters: _containers.RepeatedCompositeFieldContainer[ClusterGroup]
    items_clustered: int
    items_labelled: int
    inertia: float
    def __init__(self, clusters: _Optional[_Iterable[_Union[ClusterGroup, _Mapping]]] = ..., items_clustered: _Optional[int] = ..., items_labelled: _Optional[int] = ..., inertia: _Optional[float] = ...) -> None: ...

class UnavailableCollection(_message.Message):
    __slots__ = ("name", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
