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

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from clipsearch import upload
from clipsearch.analysis import AnalysisMixin
from clipsearch.checks import (
    _check_k,
    _exactly_one,
    _metadata_structs,
    _strings,
    _upsert_content,
)
from clipsearch.errors import BatchError, ClipSearchError, _field_violations
from clipsearch.filters import FilterSpec, to_filter
from clipsearch.images import ImageInput, _check_images, _load_image, _query_image
from clipsearch.results import (
    CollectionInfo,
    Hit,
    Record,
    ServerInfo,
    _hit,
    _record,
    encode_vector,
)
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

__all__ = ["DEFAULT_TARGET", "Client"]

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Ids per GetItems/DeleteItems request: ids are small, but a GetItems response carries
# vectors and metadata, so the count is bounded too.
_ID_CHUNK = 1024
# Room left in a request for everything that is not an item's payload.
_REQUEST_OVERHEAD = 4096


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

    @property
    def _limits(self) -> upload.Limits:
        # Requests are split to stay under half the message limit, leaving room for the rest.
        return upload.Limits(
            batch_size=self.batch_size,
            batch_bytes=self.max_message_bytes // 2,
            item_limit=self.max_message_bytes - _REQUEST_OVERHEAD,
        )

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
        checked = _check_images(images)
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
        vectors, failures = upload.embed(
            send, payloads, decode=decode, total=total, limits=self._limits, progress=progress,
            dim=lambda: self._dim if self._dim is not None else self.info().dim,
        )
        self._dim = vectors.shape[1]
        if failures:
            raise BatchError(failures, total, vectors=vectors)
        return vectors

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
        _exactly_one(images=images, texts=texts, vectors=vectors)
        ids = _strings(ids, "ids", "id")
        content = _upsert_content(len(ids), images=images, texts=texts, vectors=vectors)
        structs = _metadata_structs(len(ids), metadata)
        return upload.upsert(
            self._call, collection, ids, content, structs,
            limits=self._limits, pipeline=self.pipeline, progress=progress,
        )

    def get(
        self, collection: str, ids: Sequence[str], *, include_vectors: bool = False
    ) -> list[Record]:
        """Fetches items by id, in request order, each id once; ids not stored are left out."""
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
        _exactly_one(text=text, image=image, vector=vector, id=id)
        _check_k(k)
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
        return [_hit(hit) for hit in response.hits]

    # ---- server ------------------------------------------------------------------------

    def info(self) -> ServerInfo:
        """Describes the loaded model and the server's limits."""
        r = self._call("GetServerInfo", pb.GetServerInfoRequest())
        self._dim = r.dim or self._dim
        return ServerInfo._from_proto(r)


# --------------------------------------------------------------------------------------------
# Small helpers


def _read(path: str | os.PathLike[str] | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def _id_chunks(ids: Sequence[str]) -> Iterator[list[str]]:
    ids = _strings(ids, "ids", "id")
    for start in range(0, len(ids), _ID_CHUNK):
        yield ids[start : start + _ID_CHUNK]
