"""The clipsearch client: numpy in, numpy out, over gRPC.

The client is deliberately thin. It validates arguments before any call, splits large inputs
into requests that stay well under the message limit, and turns the wire format
(little-endian float32 bytes, ``google.protobuf.Struct``) into numpy arrays and dicts.
It imports neither torch nor Pillow: a PIL image is encoded through its own ``save`` method.

Metadata travels as a ``google.protobuf.Struct``, which is JSON: every number comes back as a
``float`` (``{"n": 1}`` is read back as ``{"n": 1.0}``) and integers beyond 2**53 lose
precision. Keys must be strings; values must be JSON-like (str, int, float, bool, None, lists,
dicts).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
from google.protobuf import struct_pb2
from tqdm import tqdm

from clipsearch.analysis import AnalysisMixin
from clipsearch.errors import (
    BatchError,
    ClipSearchError,
    ItemFailure,
    PartialWriteError,
    _field_violations,
    _item_failures,
    _malformed,
    _too_large,
)
from clipsearch.filters import FilterSpec, to_filter
from clipsearch.images import (
    ImageInput,
    _check_image,
    _image_setter,
    _is_pil_image,
    _load_image,
    _query_image,
)
from clipsearch.results import (
    CollectionInfo,
    Hit,
    Record,
    ServerInfo,
    _record,
    decode_matrix,
    decode_vector,
    encode_vector,
    metadata_to_struct,
    struct_to_metadata,
)
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # Pillow is optional: only type checkers look at it.
    pass

__all__ = [
    "BatchError",
    "Client",
    "ClipSearchError",
    "CollectionInfo",
    "Hit",
    "ImageInput",
    "ItemFailure",
    "Record",
    "ServerInfo",
]


DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Ids per GetItems/DeleteItems request: ids are small, but a GetItems response carries
# vectors and metadata, so the count is bounded too.
_ID_CHUNK = 1024
# Room left in a request for everything that is not an item's payload.
_REQUEST_OVERHEAD = 4096

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# Request batching (pure; tested without a server)


def iter_batches(
    items: Iterable[_T],
    size_of: Callable[[_T], int],
    *,
    max_items: int,
    max_bytes: int,
) -> Iterator[list[tuple[int, _T]]]:
    """Group items into batches of at most ``max_items`` and about ``max_bytes``.

    Lazy, so that only one batch of loaded images is held at a time. Yields lists of
    ``(index, item)`` with the item's position in ``items``. An item larger than ``max_bytes``
    goes alone in its batch rather than being dropped.
    """
    if max_items < 1:
        raise ValueError("max_items must be at least 1")
    batch: list[tuple[int, _T]] = []
    batch_bytes = 0
    for index, item in enumerate(items):
        size = size_of(item)
        if batch and (len(batch) >= max_items or batch_bytes + size > max_bytes):
            yield batch
            batch, batch_bytes = [], 0
        batch.append((index, item))
        batch_bytes += size
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------
# The client


class Client(AnalysisMixin):
    """A connection to a clipsearch server.

    Use it as a context manager, or call ``close()``. ``timeout`` applies to each RPC
    (a batched call makes several). Uploads keep `pipeline` requests in flight so that the
    server decodes one batch while its model runs the previous one.

    Security: ``token`` is sent as ``authorization: Bearer <token>`` on every call.
    ``tls=True`` connects over TLS checked against the system's roots, or against
    ``tls_ca`` (a PEM file) when given; ``tls_cert`` and ``tls_key`` add a client
    certificate for mutual TLS. ``credentials`` takes ready-made channel credentials instead.

    Beyond search (recommend, classify, find_duplicates, cluster): see `clipsearch.analysis`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        batch_size: int = 32,
        options: Sequence[tuple[str, Any]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        pipeline: int = 2,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if pipeline < 1:
            raise ValueError("pipeline must be at least 1")
        self.pipeline = pipeline
        if max_message_bytes < 2 * _REQUEST_OVERHEAD:
            raise ValueError(f"max_message_bytes must be at least {2 * _REQUEST_OVERHEAD}")
        self.target = target
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.batch_size = batch_size
        channel_options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *(options or ()),
        ]
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if credentials is None and (tls or tls_ca or tls_cert):
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca),
                private_key=_read(tls_key),
                certificate_chain=_read(tls_cert),
            )
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        self._stub = pb_grpc.ClipSearchServiceStub(self._channel)
        self._dim: int | None = None

    # Requests are split to stay under half the message limit, leaving room for the rest.
    @property
    def _batch_bytes(self) -> int:
        return self.max_message_bytes // 2

    @property
    def _item_limit(self) -> int:
        return self.max_message_bytes - _REQUEST_OVERHEAD

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    def _call(self, method: str, request: Any) -> Any:
        """Every RPC goes through here so that every failure is a ClipSearchError."""
        try:
            return getattr(self._stub, method)(
                request, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise ClipSearchError(code, details or "", _field_violations(exc)) from exc

    # ---- embedding ---------------------------------------------------------------------

    def embed_texts(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """Embeds texts; returns an (n, dim) float32 array of unit vectors.

        Raises BatchError if some texts failed; its ``vectors`` has NaN rows for them.
        """
        texts = _strings(texts, "texts", "text")
        return self._embed(
            [t.encode("utf-8") for t in texts],
            lambda batch: self._call("EmbedTexts", pb.EmbedTextsRequest(texts=batch)),
            decode=lambda b: b.decode("utf-8"),
            progress=progress,
            total=len(texts),
        )

    def embed_images(self, images: Sequence[ImageInput], *, progress: bool = False) -> np.ndarray:
        """Embeds images (paths, encoded bytes or PIL images); returns an (n, dim) array.

        Raises BatchError if some images failed (e.g. undecodable); its ``vectors`` has NaN
        rows for them. Files are read one batch at a time.
        """
        if isinstance(images, (str, bytes, os.PathLike)) or _is_pil_image(images):
            raise TypeError("images must be a sequence of images, not one image")
        checked = [_check_image(img, i) for i, img in enumerate(images)]
        return self._embed(
            (_load_image(img) for img in checked),
            lambda batch: self._call("EmbedImages", pb.EmbedImagesRequest(images=batch)),
            decode=lambda b: b,
            progress=progress,
            total=len(checked),
        )

    def _embed(
        self,
        payloads: Iterable[bytes],
        send: Callable[[list[Any]], Any],
        *,
        decode: Callable[[bytes], Any],
        progress: bool,
        total: int,
    ) -> np.ndarray:
        n = total
        rows: dict[int, np.ndarray] = {}
        failures: list[ItemFailure] = []
        with tqdm(total=n, unit="item", disable=not progress) as bar:
            for batch in iter_batches(
                payloads, len, max_items=self.batch_size, max_bytes=self._batch_bytes
            ):
                sendable = []
                for index, payload in batch:
                    if len(payload) > self._item_limit:
                        failures.append(_too_large(index, len(payload), self._item_limit))
                    else:
                        sendable.append((index, payload))
                if sendable:
                    response = send([decode(p) for _, p in sendable])
                    matrix = decode_matrix(response.vectors)
                    if matrix.shape[0] != len(sendable):
                        raise _malformed(f"{matrix.shape[0]} rows for {len(sendable)} items")
                    self._dim = matrix.shape[1]
                    for row, (index, _) in enumerate(sendable):
                        rows[index] = matrix[row]
                    failures.extend(_item_failures(response.errors, sendable))
                bar.update(len(batch))
        # The dimension comes from a response; with none (empty input, or every item refused
        # before sending) the server is asked, so the shape is always (n, dim).
        dim = self._dim if self._dim is not None else self.info().dim
        out = np.full((n, dim), np.nan, dtype=np.float32)
        for index, row in rows.items():
            out[index] = row
        if failures:
            failures.sort(key=lambda f: f.index)
            for failure in failures:
                out[failure.index] = np.nan
            raise BatchError(failures, n, vectors=out)
        return out

    # ---- collections -------------------------------------------------------------------

    def create_collection(
        self, name: str, *, m: int = 0, ef_construction: int = 0,
        thumbnail_size: int | None = None,
    ) -> CollectionInfo:
        """Creates an empty collection; zero HNSW settings take the server's defaults.

        ``thumbnail_size`` is the long side of the WebP thumbnails kept for image items
        (None: the server's 256; 0: none).
        """
        request = pb.CreateCollectionRequest(
            name=name, hnsw=pb.HnswConfig(m=m, ef_construction=ef_construction),
            thumbnail_size=thumbnail_size,
        )
        return CollectionInfo._from_proto(self._call("CreateCollection", request).collection)

    def collections(self) -> list[CollectionInfo]:
        """Lists every collection."""
        response = self._call("ListCollections", pb.ListCollectionsRequest())
        return [CollectionInfo._from_proto(c) for c in response.collections]

    def collection(self, name: str) -> CollectionInfo:
        """Describes one collection; ClipSearchError NOT_FOUND when it does not exist."""
        response = self._call("GetCollection", pb.GetCollectionRequest(name=name))
        return CollectionInfo._from_proto(response.collection)

    def drop_collection(self, name: str) -> bool:
        """Drops a collection and its items; False when there was no such collection."""
        return self._call("DropCollection", pb.DropCollectionRequest(name=name)).dropped

    # ---- items -------------------------------------------------------------------------

    def upsert(
        self,
        collection: str,
        *,
        ids: Sequence[str],
        images: Sequence[ImageInput] | None = None,
        texts: Sequence[str] | None = None,
        vectors: Any = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        progress: bool = False,
    ) -> int:
        """Inserts or replaces items; exactly one of images, texts or vectors gives content.

        Returns the number written. The collection is created on first write. Items are sent
        in batches; if some fail, the rest are still written and BatchError is raised at the
        end (``errors`` index into ``ids``). An RPC failure stops sending at the batch it hit
        and raises PartialWriteError; both errors carry ``written_ids`` and
        ``not_written_ids``. Upsert is idempotent, so resending what was not written is safe.
        """
        given = [
            name
            for name, v in (("images", images), ("texts", texts), ("vectors", vectors))
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(f"give exactly one of images, texts or vectors (got {given or 0})")
        ids = _strings(ids, "ids", "id")
        n = len(ids)

        contents: Iterable[Callable[[pb.Item], None]]
        if texts is not None:
            if isinstance(texts, str):
                raise TypeError("texts must be a sequence of strings, not one string")
            texts = list(texts)
            _check_length("texts", len(texts), n)
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise TypeError(f"text {i} must be a str, got {type(text).__name__}")
            contents = (_setter("text", t) for t in texts)
        elif images is not None:
            if isinstance(images, (str, bytes, os.PathLike)) or _is_pil_image(images):
                raise TypeError("images must be a sequence of images, not one image")
            checked = [_check_image(img, i) for i, img in enumerate(images)]
            _check_length("images", len(checked), n)
            contents = (_image_setter(img) for img in checked)
        else:
            arr = np.asarray(vectors, dtype=np.float32)
            if arr.ndim == 1 and arr.size == 0:
                arr = arr.reshape(0, 0)
            if arr.ndim != 2:
                raise ValueError(f"vectors must be 2-D (n, dim), got shape {arr.shape}")
            _check_length("vectors", arr.shape[0], n)
            wire = [encode_vector(row) for row in arr]
            contents = (_setter("vector", v) for v in wire)

        structs: list[struct_pb2.Struct | None] = [None] * n
        if metadata is not None:
            metadata = list(metadata)
            _check_length("metadata", len(metadata), n)
            structs = [metadata_to_struct(m) if m is not None else None for m in metadata]

        def items() -> Iterator[pb.Item]:
            for id_, set_content, struct in zip(ids, contents, structs, strict=True):
                item = pb.Item(id=id_)
                set_content(item)
                if struct is not None:
                    item.metadata.CopyFrom(struct)
                yield item

        written = 0
        failures: list[ItemFailure] = []
        stored: set[int] = set()  # indexes whose request succeeded and item was not refused
        rpc_error: ClipSearchError | None = None
        # Keep `pipeline` requests in flight: the server decodes one batch while the model
        # runs the previous one, instead of idling between round trips.
        in_flight: collections.deque[tuple[Future, list, int]] = collections.deque()

        def finish_oldest() -> None:
            nonlocal written, rpc_error
            future, sendable, count = in_flight.popleft()
            if sendable:
                try:
                    response = future.result()
                except ClipSearchError as exc:
                    rpc_error = rpc_error or exc  # send no more; the report comes at the end
                else:
                    written += response.upserted
                    refused = _item_failures(response.errors, sendable)
                    failures.extend(refused)
                    stored.update({i for i, _ in sendable} - {f.index for f in refused})
            bar.update(count)

        with tqdm(total=n, unit="item", disable=not progress) as bar, ThreadPoolExecutor(
            self.pipeline, thread_name_prefix="clipsearch-upload"
        ) as pool:
            for batch in iter_batches(
                items(), pb.Item.ByteSize, max_items=self.batch_size, max_bytes=self._batch_bytes
            ):
                if rpc_error is not None:
                    break
                sendable = []
                for index, item in batch:
                    size = item.ByteSize()
                    if size > self._item_limit:
                        failures.append(_too_large(index, size, self._item_limit))
                    else:
                        sendable.append((index, item))
                future: Future = Future()
                if sendable:
                    request = pb.UpsertItemsRequest(
                        collection=collection, items=[item for _, item in sendable]
                    )
                    future = pool.submit(self._call, "UpsertItems", request)
                in_flight.append((future, sendable, len(batch)))
                if len(in_flight) >= self.pipeline:
                    finish_oldest()
            while in_flight:
                finish_oldest()
        failures.sort(key=lambda f: f.index)
        if rpc_error is not None or failures:
            written_ids = [id_ for i, id_ in enumerate(ids) if i in stored]
            not_written_ids = [id_ for i, id_ in enumerate(ids) if i not in stored]
            if rpc_error is not None:
                raise PartialWriteError(rpc_error, written_ids, not_written_ids, failures)
            raise BatchError(failures, n, upserted=written, written_ids=written_ids,
                             not_written_ids=not_written_ids)
        return written

    def get(
        self, collection: str, ids: Sequence[str], *, include_vectors: bool = False
    ) -> list[Record]:
        """Fetches items by id, in request order; ids that are not stored are left out."""
        records: list[Record] = []
        for chunk in _id_chunks(ids):
            request = pb.GetItemsRequest(
                collection=collection, ids=chunk, include_vectors=include_vectors
            )
            response = self._call("GetItems", request)
            records.extend(_record(item) for item in response.items)
        return records

    def delete(self, collection: str, ids: Sequence[str]) -> int:
        """Deletes items by id; returns how many existed. Absent ids are not an error."""
        deleted = 0
        for chunk in _id_chunks(ids):
            request = pb.DeleteItemsRequest(collection=collection, ids=chunk)
            deleted += self._call("DeleteItems", request).deleted
        return deleted

    def count(self, collection: str, *, filter: FilterSpec | pb.Filter | None = None) -> int:
        """Counts the items of a collection, or those a filter matches."""
        request = pb.CountItemsRequest(collection=collection)
        if filter is not None:
            request.filter.CopyFrom(to_filter(filter))
        return self._call("CountItems", request).count

    def list_page(
        self,
        collection: str,
        *,
        filter: FilterSpec | pb.Filter | None = None,
        page_size: int = 100,
        page_token: str = "",
        include_vectors: bool = False,
    ) -> tuple[list[Record], str]:
        """One page of items in id order and the token of the next ("" after the last)."""
        request = pb.ListItemsRequest(
            collection=collection, page_size=page_size, page_token=page_token,
            include_vectors=include_vectors,
        )
        if filter is not None:
            request.filter.CopyFrom(to_filter(filter))
        response = self._call("ListItems", request)
        return [_record(item) for item in response.items], response.next_page_token

    def scroll(
        self,
        collection: str,
        *,
        filter: FilterSpec | pb.Filter | None = None,
        page_size: int = 100,
        include_vectors: bool = False,
    ) -> Iterator[Record]:
        """Every item (or every matching one) in id order, fetched a page at a time."""
        token = ""
        while True:
            records, token = self.list_page(
                collection, filter=filter, page_size=page_size, page_token=token,
                include_vectors=include_vectors,
            )
            yield from records
            if not token:
                return

    # ---- search ------------------------------------------------------------------------

    def search(
        self,
        collection: str,
        *,
        text: str | None = None,
        image: ImageInput | None = None,
        vector: Any = None,
        id: str | None = None,
        k: int = 10,
        ef: int = 0,
        filter: FilterSpec | pb.Filter | None = None,
        include_vectors: bool = False,
    ) -> list[Hit]:
        """The k items nearest to exactly one query: a text, an image, a vector or a stored id.

        Hits come best first. ``ef`` 0 takes the server's default candidate list size.
        ``filter`` (see `clipsearch.filters`) limits the hits to matching items.
        """
        given = [
            name
            for name, v in (("text", text), ("image", image), ("vector", vector), ("id", id))
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image, vector or id (got {given or 0})")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if not isinstance(ef, int) or ef < 0:
            raise ValueError(f"ef must be a non-negative integer, got {ef!r}")
        request = pb.SearchRequest(
            collection=collection, k=k, ef=ef, include_vectors=include_vectors
        )
        if filter is not None:
            request.filter.CopyFrom(to_filter(filter))
        if text is not None:
            if not isinstance(text, str):
                raise TypeError(f"text must be a str, got {type(text).__name__}")
            request.text = text
        elif id is not None:
            if not isinstance(id, str):
                raise TypeError(f"id must be a str, got {type(id).__name__}")
            request.id = id
        elif vector is not None:
            request.vector.CopyFrom(encode_vector(vector))
        else:
            request.image = _query_image(image)
        response = self._call("Search", request)
        return [
            Hit(
                id=hit.id,
                score=float(hit.score),
                metadata=struct_to_metadata(hit.metadata),
                vector=decode_vector(hit.vector) if hit.HasField("vector") else None,
            )
            for hit in response.hits
        ]

    # ---- server ------------------------------------------------------------------------

    def info(self) -> ServerInfo:
        """Describes the loaded model and the server's limits."""
        r = self._call("GetServerInfo", pb.GetServerInfoRequest())
        self._dim = r.dim or self._dim
        return ServerInfo(
            model=r.model,
            pretrained=r.pretrained,
            checkpoint=r.checkpoint,
            random_weights=r.random_weights,
            dim=r.dim,
            device=r.device,
            precision=r.precision,
            model_fingerprint=r.model_fingerprint,
            version=r.version,
            max_message_bytes=r.max_message_bytes,
            max_k=r.max_k,
            image_size=r.image_size,
            precision_reason=r.precision_reason,
            unavailable_collections={u.name: u.reason for u in r.unavailable_collections},
        )


# --------------------------------------------------------------------------------------------
# Small helpers


def _strings(values: Sequence[str], name: str, each: str) -> list[str]:
    """A list of str, or a TypeError naming the argument (one str is a common slip)."""
    if isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of strings, not one string")
    values = list(values)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{each} {i} must be a str, got {type(value).__name__}")
    return values


def _read(path: str | os.PathLike[str] | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def _check_length(name: str, got: int, want: int) -> None:
    if got != want:
        raise ValueError(f"{name} has {got} entries but ids has {want}")


def _setter(field_name: str, value: Any) -> Callable[[pb.Item], None]:
    def set_content(item: pb.Item) -> None:
        if isinstance(value, pb.Vector):
            item.vector.CopyFrom(value)
        else:
            setattr(item, field_name, value)

    return set_content


def _id_chunks(ids: Sequence[str]) -> Iterator[list[str]]:
    if isinstance(ids, str):
        raise TypeError("ids must be a sequence of strings, not one string")
    ids = list(ids)
    for i, id_ in enumerate(ids):
        if not isinstance(id_, str):
            raise TypeError(f"id {i} must be a str, got {type(id_).__name__}")
    for start in range(0, len(ids), _ID_CHUNK):
        yield ids[start : start + _ID_CHUNK]


