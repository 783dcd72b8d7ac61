"""What the client hands back (collections, server info, records, hits) and the wire forms:
vectors as little-endian float32 bytes, metadata as google.protobuf.Struct."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from google.protobuf import json_format, struct_pb2

from clipsearch.errors import _malformed
from clipsearch.filters import with_stored_times
from clipsearch.v1 import clipsearch_pb2 as pb


@dataclass(frozen=True)
class CollectionInfo:
    """A collection as the server describes it; ``created_at`` is seconds since the epoch."""

    name: str
    count: int
    dim: int
    model_fingerprint: str
    m: int
    ef_construction: int
    created_at: float
    # long side of the WebP thumbnails kept for image items; 0 = none
    thumbnail_size: int = 0

    @classmethod
    def _from_proto(cls, msg: pb.CollectionInfo) -> CollectionInfo:
        return cls(
            name=msg.name,
            count=msg.count,
            dim=msg.dim,
            model_fingerprint=msg.model_fingerprint,
            m=msg.hnsw.m,
            ef_construction=msg.hnsw.ef_construction,
            created_at=msg.created_at,
            thumbnail_size=msg.thumbnail_size,
        )


@dataclass(frozen=True)
class ServerInfo:
    """The loaded model and the server's limits (mirrors GetServerInfoResponse)."""

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
    precision_reason: str = ""  # why the server runs in `precision` (auto's choice)
    # Collections on disk the server could not open at start: name -> reason. Not served.
    unavailable_collections: dict[str, str] = field(default_factory=dict)
    backend: str = ""  # torch or onnxruntime
    backend_reason: str = ""  # why (what --backend auto measured)
    # What the server measured of each tower ("image", "text") and chose from it.
    towers: dict[str, TowerTuning] = field(default_factory=dict)

    @classmethod
    def _from_proto(cls, r: pb.GetServerInfoResponse) -> ServerInfo:
        unavailable = {u.name: u.reason for u in r.unavailable_collections}
        towers = {t.tower: TowerTuning(t.batch_size, t.inputs_per_second, t.reason)
                  for t in r.towers}
        # Every other field is the response's field of the same name.
        same = {f.name: getattr(r, f.name) for f in fields(cls)
                if f.name not in ("unavailable_collections", "towers")}
        return cls(**same, unavailable_collections=unavailable, towers=towers)


@dataclass(frozen=True)
class TowerTuning:
    """One tower's measured speed on the server and the bulk batch size chosen from it."""

    batch_size: int
    inputs_per_second: float  # model time only: the ceiling for end-to-end throughput
    reason: str


@dataclass
class Record:
    """A stored item; ``vector`` is None unless vectors were asked for."""

    id: str
    metadata: dict[str, Any] = field(default_factory=dict)
    vector: np.ndarray | None = None


@dataclass
class Hit:
    """One search result; ``score`` is the cosine similarity, higher is nearer."""

    id: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    vector: np.ndarray | None = None


def encode_vector(vector: Any) -> pb.Vector:
    """One vector as little-endian float32 bytes; accepts a 1-D or a one-row 2-D array-like."""
    arr = np.asarray(vector, dtype=np.float32)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"a vector must be 1-D and not empty, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("a vector must not contain NaN or infinity")
    return pb.Vector(data=arr.astype("<f4").tobytes(), dim=arr.shape[0])


def decode_vector(msg: pb.Vector) -> np.ndarray:
    """A wire vector as a writable native float32 array; checks the byte length."""
    if len(msg.data) != 4 * msg.dim:
        raise _malformed(f"vector of dim {msg.dim} has {len(msg.data)} bytes")
    return np.frombuffer(msg.data, dtype="<f4").astype(np.float32)


def encode_matrix(matrix: Any) -> pb.Matrix:
    """An (n, dim) array-like as a wire matrix."""
    arr = np.asarray(matrix, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"a matrix must be 2-D, got shape {arr.shape}")
    return pb.Matrix(data=arr.astype("<f4").tobytes(), rows=arr.shape[0], dim=arr.shape[1])


def decode_matrix(msg: pb.Matrix) -> np.ndarray:
    """A wire matrix as a writable native float32 array of shape (rows, dim)."""
    if len(msg.data) != 4 * msg.rows * msg.dim:
        raise _malformed(f"matrix {msg.rows}x{msg.dim} has {len(msg.data)} bytes")
    arr = np.frombuffer(msg.data, dtype="<f4").astype(np.float32)
    return arr.reshape(msg.rows, msg.dim)


def metadata_to_struct(metadata: Mapping[str, Any] | None) -> struct_pb2.Struct:
    """A JSON-like mapping as a Struct; TypeError for anything JSON cannot hold.

    Timezone-aware datetimes (and dates) are stored as ISO 8601 UTC text (see
    filters.stored_time), the form the server's time ranges compare against."""
    struct = struct_pb2.Struct()
    if metadata is None:
        return struct
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping, got {type(metadata).__name__}")
    try:
        json_format.ParseDict(with_stored_times(metadata), struct)
    except (json_format.ParseError, TypeError, ValueError, AttributeError) as exc:
        raise TypeError(f"metadata is not JSON-like: {exc}") from exc
    return struct


def struct_to_metadata(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a dict; numbers come back as floats (that is what a Struct stores)."""
    return json_format.MessageToDict(struct)


def _record(item: pb.StoredItem) -> Record:
    return Record(item.id, *_payload(item))


def _hit(hit: pb.Hit) -> Hit:
    return Hit(hit.id, float(hit.score), *_payload(hit))


def _payload(msg: pb.StoredItem | pb.Hit) -> tuple[dict[str, Any], np.ndarray | None]:
    """The metadata of a stored item or a hit, and its vector when one was sent."""
    vector = decode_vector(msg.vector) if msg.HasField("vector") else None
    return struct_to_metadata(msg.metadata), vector
