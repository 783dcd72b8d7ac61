"""The gRPC servicer: validates requests and maps proto <-> domain.

No business logic lives here; collections, the embedder and the model do the work. The wire's
shared pieces (status mapping, codecs, id and limit checks) are in `wire`. Blocking work
(SQLite, hnswlib) runs in threads so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import numpy as np

from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

from . import __version__, wire
from .analysis_rpcs import AnalysisRpcs
from .encoders import Embedded, Encoder, ModelInfo
from .errors import ClipSearchError, InvalidArgument, NotFound, Unavailable
from .heavy_work import HeavyWork
from .reply_budget import ReplyBudget, with_thumbnails
from .settings import AnySettings
from .stores import CollectionRegistry
from .stores.base import CollectionInfo, NewItem, Record, check_name
from .stores.base import CollectionStore as Collection
from .thumbnails import DEFAULT_THUMBNAIL_SIZE, check_size

Ctx = grpc.aio.ServicerContext


class ClipSearchServicer(AnalysisRpcs, pb_grpc.ClipSearchServiceServicer):
    """Implements clipsearch.v1.ClipSearchService (Recommend, Classify, FindDuplicates and
    Cluster come from the AnalysisRpcs mixin)."""

    def __init__(self, settings: AnySettings) -> None:
        self.settings = settings
        self._encoder: Encoder | None = None
        self._collections: CollectionRegistry | None = None
        self.heavy = HeavyWork(settings.max_heavy_calls, settings.max_heavy_calls_per_caller)

    def ready(self, encoder: Encoder, collections: CollectionRegistry) -> None:
        """Start answering: until now every call gets UNAVAILABLE."""
        self._encoder, self._collections = encoder, collections

    @property
    def model(self) -> ModelInfo:
        return self.embedder.info

    @property
    def embedder(self) -> Encoder:
        if self._encoder is None:
            raise Unavailable("the server is still loading its model")
        return self._encoder

    @property
    def collections(self) -> CollectionRegistry:
        if self._collections is None:
            raise Unavailable("the server is still opening its collections")
        return self._collections

    # --- embedding ------------------------------------------------------------------------
    @wire.grpc_errors
    async def EmbedTexts(self, request: pb.EmbedTextsRequest, context: Ctx
                         ) -> pb.EmbedTextsResponse:
        self._check_count(len(request.texts), "texts")
        embedded = await self.embedder.embed_texts(list(request.texts), wire.deadline(context))
        return pb.EmbedTextsResponse(vectors=wire.matrix(embedded.vectors),
                                     errors=wire.item_errors(embedded.errors))

    @wire.grpc_errors
    async def EmbedImages(self, request: pb.EmbedImagesRequest, context: Ctx
                          ) -> pb.EmbedImagesResponse:
        self._check_count(len(request.images), "images")
        embedded = await self.embedder.embed_images(list(request.images), wire.deadline(context))
        return pb.EmbedImagesResponse(vectors=wire.matrix(embedded.vectors),
                                      errors=wire.item_errors(embedded.errors))

    # --- collections ----------------------------------------------------------------------
    @wire.grpc_errors
    async def CreateCollection(self, request: pb.CreateCollectionRequest, context: Ctx
                               ) -> pb.CreateCollectionResponse:
        m, efc = request.hnsw.m, request.hnsw.ef_construction
        if m:
            wire.in_range(m, 2, 128, "hnsw.m")
        if efc:
            wire.in_range(efc, 1, 4096, "hnsw.ef_construction")
        thumbs = (request.thumbnail_size if request.HasField("thumbnail_size")
                  else DEFAULT_THUMBNAIL_SIZE)
        check_size(thumbs)
        collection = await asyncio.to_thread(self.collections.create, request.name, m, efc,
                                             False, thumbs)
        return pb.CreateCollectionResponse(collection=_collection_info(collection.info()))

    @wire.grpc_errors
    async def ListCollections(self, request: pb.ListCollectionsRequest, context: Ctx
                              ) -> pb.ListCollectionsResponse:
        infos = []
        for name in self.collections.names():
            try:
                infos.append(_collection_info(self.collections.get(name).info()))
            except NotFound:
                continue  # dropped meanwhile
        return pb.ListCollectionsResponse(collections=infos)

    @wire.grpc_errors
    async def GetCollection(self, request: pb.GetCollectionRequest, context: Ctx
                            ) -> pb.GetCollectionResponse:
        info = self.collections.get(request.name).info()
        return pb.GetCollectionResponse(collection=_collection_info(info))

    @wire.grpc_errors
    async def DropCollection(self, request: pb.DropCollectionRequest, context: Ctx
                             ) -> pb.DropCollectionResponse:
        dropped = await asyncio.to_thread(self.collections.drop, request.name)
        return pb.DropCollectionResponse(dropped=dropped)

    # --- items ----------------------------------------------------------------------------
    @wire.grpc_errors
    async def UpsertItems(self, request: pb.UpsertItemsRequest, context: Ctx
                          ) -> pb.UpsertItemsResponse:
        self._check_count(len(request.items), "items")
        check_name(request.collection)
        # Created on first write, but only once something is written: a request whose items
        # are all refused changes nothing.
        existing = self.collections.find(request.collection)
        dim = existing.dim if existing is not None else self.model.dim
        errors: dict[int, ClipSearchError] = {}
        vectors: dict[int, np.ndarray] = {}
        metadata: dict[int, dict] = {}
        images: list[tuple[int, bytes]] = []
        texts: list[tuple[int, str]] = []
        for i, item in enumerate(request.items):
            try:
                wire.check_id(item.id)
                metadata[i] = wire.metadata_dict(item.metadata)
                kind = item.WhichOneof("content")
                if kind == "image":
                    images.append((i, item.image))
                elif kind == "text":
                    texts.append((i, item.text))
                elif kind == "vector":
                    vectors[i] = wire.unit_vector(item.vector, dim, f"items[{i}].vector")
                else:
                    raise InvalidArgument("item has no content: set image, text or vector")
            except ClipSearchError as exc:
                errors[i] = exc
        if (images or texts) and existing is not None:
            existing.check_model(self.model.fingerprint)
        deadline = wire.deadline(context)
        # The encoder makes the thumbnails from the pictures it decodes for the model.
        size = existing.thumbnail_size if existing is not None else DEFAULT_THUMBNAIL_SIZE
        thumbs: dict[int, bytes | None] = {}
        for positions, embedded in (
            ([i for i, _ in images],
             await self._embed_images([b for _, b in images], deadline, bulk=True,
                                      thumbnail_size=size)),
            ([i for i, _ in texts],
             await self._embed_texts([t for _, t in texts], deadline, bulk=True)),
        ):
            for row, i in enumerate(positions):
                if row in embedded.errors:
                    errors[i] = embedded.errors[row]
                else:
                    vectors[i] = embedded.vectors[row]
                if embedded.thumbnails is not None:
                    thumbs[i] = embedded.thumbnails[row]
        new_items = [NewItem(request.items[i].id, vectors[i], metadata[i], thumbs.get(i))
                     for i in sorted(vectors) if i not in errors]
        written = 0
        if new_items:
            collection = existing or await asyncio.to_thread(
                self.collections.create, request.collection, 0, 0, True)
            written = await asyncio.to_thread(collection.upsert, new_items)
        return pb.UpsertItemsResponse(upserted=written, errors=wire.item_errors(errors))

    @wire.grpc_errors
    async def GetItems(self, request: pb.GetItemsRequest, context: Ctx) -> pb.GetItemsResponse:
        self._check_count(len(request.ids), "ids")
        collection = self.collections.get(request.collection)
        ids = list(dict.fromkeys(request.ids))  # a repeated id is answered once
        found = await asyncio.to_thread(collection.get, ids)
        items = await with_thumbnails(
            [found[i] for i in ids if i in found], lambda r: r.id,
            collection.thumbnails if request.include_thumbnails else None,
            _stored_item(request.include_vectors), ReplyBudget(self.settings.max_message_bytes),
            "items")
        return pb.GetItemsResponse(items=items, missing_ids=[i for i in ids if i not in found])

    @wire.grpc_errors
    async def DeleteItems(self, request: pb.DeleteItemsRequest, context: Ctx
                          ) -> pb.DeleteItemsResponse:
        self._check_count(len(request.ids), "ids")
        collection = self.collections.get(request.collection)
        deleted = await asyncio.to_thread(collection.delete, list(request.ids))
        return pb.DeleteItemsResponse(deleted=deleted)

    @wire.grpc_errors
    async def CountItems(self, request: pb.CountItemsRequest, context: Ctx
                         ) -> pb.CountItemsResponse:
        collection = self.collections.get(request.collection)
        where = wire.where(request, collection)
        count = await asyncio.to_thread(collection.count_matching, where)
        return pb.CountItemsResponse(count=count)

    @wire.grpc_errors
    async def ListItems(self, request: pb.ListItemsRequest, context: Ctx
                        ) -> pb.ListItemsResponse:
        size = wire.page_size(request.page_size)
        collection = self.collections.get(request.collection)
        after = wire.decode_page_token(request.page_token) if request.page_token else None
        records = await asyncio.to_thread(collection.page, wire.where(request, collection),
                                          after, size + 1)
        more = len(records) > size
        records = records[:size]
        # A page past the reply limit ends early; its token continues after its last item.
        items = await with_thumbnails(
            records, lambda r: r.id, collection.thumbnails if request.include_thumbnails else None,
            _stored_item(request.include_vectors), ReplyBudget(self.settings.max_message_bytes),
            "items", partial=True)
        more = more or len(items) < len(records)
        return pb.ListItemsResponse(
            items=items, next_page_token=wire.encode_page_token(items[-1].id) if more else "")

    # --- search ---------------------------------------------------------------------------
    @wire.grpc_errors
    async def Search(self, request: pb.SearchRequest, context: Ctx) -> pb.SearchResponse:
        s = self.settings
        wire.check_k(request.k, s.max_k)
        wire.check_ef(request.ef, s.max_ef)
        collection = self.collections.get(request.collection)
        where = wire.where(request, collection)
        query = await self._query_vector(request, collection, wire.deadline(context))
        default_ef = s.default_ef_text if request.WhichOneof("query") == "text" else s.default_ef
        hits = await asyncio.to_thread(
            collection.search, query, request.k, request.ef or default_ef, where)
        with_vectors = request.include_vectors
        return pb.SearchResponse(hits=await with_thumbnails(
            hits, lambda h: h.id, collection.thumbnails if request.include_thumbnails else None,
            lambda h, thumb: pb.Hit(id=h.id, score=h.score, metadata=wire.struct(h.metadata),
                                    thumbnail=thumb,
                                    vector=wire.vector(h.vector) if with_vectors else None),
            ReplyBudget(self.settings.max_message_bytes), "hits"))

    async def _query_vector(self, request: pb.SearchRequest, collection: Collection,
                            deadline: float | None) -> np.ndarray:
        kind = request.WhichOneof("query")
        if kind == "vector":
            return wire.unit_vector(request.vector, collection.dim, "vector")
        if kind == "id":
            found = await asyncio.to_thread(collection.get, [request.id])
            if request.id not in found:
                raise NotFound(f"no item {request.id!r} in collection {collection.name!r}")
            return found[request.id].vector
        if kind in ("text", "image"):
            collection.check_model(self.model.fingerprint)
            embedded = (await self._embed_texts([request.text], deadline) if kind == "text"
                        else await self._embed_images([request.image], deadline))
            if 0 in embedded.errors:
                raise embedded.errors[0]
            return embedded.vectors[0]
        raise InvalidArgument("search needs a query: set text, image, vector or id")

    # --- server ---------------------------------------------------------------------------
    @wire.grpc_errors
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: Ctx
                            ) -> pb.GetServerInfoResponse:
        m = self.model
        return pb.GetServerInfoResponse(
            model=m.name, pretrained=m.pretrained or "",
            checkpoint=m.checkpoint or "",
            random_weights=m.random_weights, dim=m.dim, device=str(m.device),
            precision=m.precision, model_fingerprint=m.fingerprint, version=__version__,
            max_message_bytes=self.settings.max_message_bytes, max_k=self.settings.max_k,
            image_size=m.image_size, precision_reason=m.precision_reason,
            unavailable_collections=[
                pb.UnavailableCollection(name=name, reason=reason)
                for name, reason in sorted(self.collections.unavailable.items())],
            backend=m.backend, backend_reason=m.backend_reason,
            towers=[pb.TowerTuning(tower=t.tower, batch_size=t.batch_size,
                                   inputs_per_second=t.inputs_per_second, reason=t.reason)
                    for t in self.embedder.tuning()],
        )

    # --- helpers --------------------------------------------------------------------------
    async def _embed_images(self, images: list[bytes], deadline: float | None,
                            bulk: bool = False, thumbnail_size: int = 0) -> Embedded:
        if not images:
            return Embedded(np.zeros((0, self.model.dim), np.float32), {})
        return await self.embedder.embed_images(images, deadline, bulk, thumbnail_size)

    async def _embed_texts(self, texts: list[str], deadline: float | None,
                           bulk: bool = False) -> Embedded:
        if not texts:
            return Embedded(np.zeros((0, self.model.dim), np.float32), {})
        return await self.embedder.embed_texts(texts, deadline, bulk)

    def _check_count(self, n: int, what: str) -> None:
        if n == 0:
            raise InvalidArgument(f"{what} is empty", what)
        if n > self.settings.max_items_per_request:
            raise InvalidArgument(
                f"{n} {what} in one request, over the limit of "
                f"{self.settings.max_items_per_request}; send them in batches", what)


def _stored_item(with_vectors: bool) -> Callable[[Record, bytes | None], pb.StoredItem]:
    """A stored record (and its thumbnail) as a reply entry."""
    def make(record: Record, thumbnail: bytes | None) -> pb.StoredItem:
        return pb.StoredItem(id=record.id, metadata=wire.struct(record.metadata),
                             thumbnail=thumbnail,
                             vector=wire.vector(record.vector) if with_vectors else None)

    return make


def _collection_info(info: CollectionInfo) -> pb.CollectionInfo:
    return pb.CollectionInfo(
        name=info.name, count=info.count, dim=info.dim, model_fingerprint=info.model_fingerprint,
        hnsw=pb.HnswConfig(m=info.m, ef_construction=info.ef_construction),
        created_at=info.created_at, thumbnail_size=info.thumbnail_size,
    )
