"""The Recommend, Classify, FindDuplicates and Cluster RPCs, mixed into the servicer.

Validation and mapping live here; the maths is in `analysis`, whole-collection reads in
each store's `read_vectors` and `find_duplicates`. Text and image examples go through the
same encoder (batcher, text cache) as search queries. Blocking work (stores, k-means) runs
in threads. Every RPC is read-only except Cluster with a `metadata_key`.
"""

from __future__ import annotations

import re
from typing import Any

import grpc
import numpy as np

from clipsearch.v1 import clipsearch_pb2 as pb

from . import analysis, wire
from .errors import ClipSearchError, InvalidArgument, NotFound, ResourceExhausted
from .heavy_work import HeavyCall
from .lru import LruCache
from .reply_budget import ReplyBudget
from .stores.base import CollectionStore as Collection

DEFAULT_NEGATIVE_WEIGHT = 0.5
MAX_NEGATIVE_WEIGHT = 10.0
MAX_EXAMPLES = 256
DEFAULT_TEMPLATE = "a photo of a {}."
MAX_LABELS = 1000
MAX_TEMPLATES = 100
MAX_PROMPTS = 20_000  # labels x templates embedded by one call
MAX_LABEL_CHARS = 300
DEFAULT_TOP_N = 5
LABEL_CACHE_SIZE = 20_000
# Re-encoded and resized copies of a photo stay above this with CLIP ViT-B models, while
# different shots of one scene mostly fall below it (README, "Near-duplicates").
DEFAULT_DUPLICATE_THRESHOLD = 0.95
DEFAULT_NEIGHBOURS = 10
MAX_NEIGHBOURS = 100
DUPLICATES_CACHE_SIZE = 4  # whole result sets, so that paging one does not redo the work
MAX_CLUSTERS = 1000
MAX_CENTRAL = 100
METADATA_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STRATEGIES = {
    pb.RECOMMEND_STRATEGY_UNSPECIFIED: pb.RECOMMEND_STRATEGY_AVERAGE_VECTOR,
    pb.RECOMMEND_STRATEGY_AVERAGE_VECTOR: pb.RECOMMEND_STRATEGY_AVERAGE_VECTOR,
    pb.RECOMMEND_STRATEGY_BEST_SCORE: pb.RECOMMEND_STRATEGY_BEST_SCORE,
}


class AnalysisRpcs:
    """Mixin of ClipSearchServicer: uses its settings, model, collections, heavy-work pool,
    `_embed_texts`, `_embed_images` and `_check_count`."""

    # --- Recommend ------------------------------------------------------------------------
    @wire.grpc_errors
    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
                        ) -> pb.RecommendResponse:
        s = self.settings
        wire.check_k(request.k, s.max_k)
        wire.check_ef(request.ef, s.max_ef)
        if not request.positives:
            raise InvalidArgument("positives is empty: give at least one example", "positives")
        if len(request.positives) + len(request.negatives) > MAX_EXAMPLES:
            raise InvalidArgument(f"more than {MAX_EXAMPLES} examples in one request",
                                  "positives")
        weight = (request.negative_weight if request.HasField("negative_weight")
                  else DEFAULT_NEGATIVE_WEIGHT)
        if not 0.0 <= weight <= MAX_NEGATIVE_WEIGHT:  # NaN fails too
            raise InvalidArgument(f"negative_weight must be 0..{MAX_NEGATIVE_WEIGHT:g}, not "
                                  f"{weight}", "negative_weight")
        strategy = _STRATEGIES.get(request.strategy)
        if strategy is None:
            raise InvalidArgument(f"unknown strategy {request.strategy}", "strategy")
        collection = self.collections.get(request.collection)
        where = wire.where(request, collection)
        deadline = wire.deadline(context)
        async with self.heavy.call(context, deadline) as call:
            positives, pos_ids = await self._examples(collection, request.positives,
                                                      "positives", deadline, call)
            negatives, neg_ids = await self._examples(collection, request.negatives,
                                                      "negatives", deadline, call)
            exclude = set(pos_ids) | set(neg_ids)
            ef = request.ef or s.default_ef
            if strategy == pb.RECOMMEND_STRATEGY_AVERAGE_VECTOR:
                try:
                    query = analysis.average_vector_query(positives, negatives, weight)
                except ValueError:
                    raise InvalidArgument("the negatives cancel the positives out: nothing is "
                                          "left to search for", "negatives") from None
                found = await call.run(
                    collection.search, query, request.k + len(exclude), ef, where)
                hits = [(h, h.score) for h in found if h.id not in exclude][:request.k]
            else:
                hits = await call.run(
                    analysis.best_score_hits,
                    lambda vector, k, ef_: collection.search(vector, k, ef_, where),
                    positives, negatives, request.k, ef, exclude, call.check)
        budget = ReplyBudget(s.max_message_bytes)
        entries = []
        for h, score in hits:
            entry = pb.Hit(id=h.id, score=score, metadata=wire.struct(h.metadata),
                           vector=wire.vector(h.vector) if request.include_vectors else None)
            budget.add(entry, len(entries), "hits")
            entries.append(entry)
        return pb.RecommendResponse(hits=entries)

    async def _examples(self, collection: Collection, examples: Any, field: str,
                        deadline: float | None, call: HeavyCall
                        ) -> tuple[np.ndarray, list[str]]:
        """Unit vectors of the examples in order, and the stored ids among them."""
        rows: dict[int, np.ndarray] = {}
        ids: dict[int, str] = {}
        texts: list[tuple[int, str]] = []
        images: list[tuple[int, bytes]] = []
        for i, example in enumerate(examples):
            kind = example.WhichOneof("example")
            if kind == "id":
                ids[i] = example.id
            elif kind == "text":
                texts.append((i, example.text))
            elif kind == "image":
                images.append((i, example.image))
            elif kind == "vector":
                rows[i] = wire.unit_vector(example.vector, collection.dim,
                                           f"{field}[{i}].vector")
            else:
                raise InvalidArgument(f"{field}[{i}] is empty: set id, text, image or vector",
                                      f"{field}[{i}]")
        if ids:
            rows.update(await _stored_vectors(collection, ids, field, call, f"{field}: "))
        if texts or images:
            collection.check_model(self.model.fingerprint)
        for kind, pending, embed in (("text", texts, self._embed_texts),
                                     ("image", images, self._embed_images)):
            embedded = await embed([value for _, value in pending], deadline)
            for row, (i, _) in enumerate(pending):
                if row in embedded.errors:
                    error = embedded.errors[row]
                    error.field = f"{field}[{i}].{kind}"
                    raise error
                rows[i] = embedded.vectors[row]
        matrix = (np.stack([rows[i] for i in range(len(rows))]) if rows
                  else np.zeros((0, collection.dim), np.float32))
        return matrix.astype(np.float32, copy=False), list(ids.values())

    # --- Classify -------------------------------------------------------------------------
    @wire.grpc_errors
    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
                       ) -> pb.ClassifyResponse:
        self._check_count(len(request.inputs), "inputs")
        labels, templates = _check_labels(list(request.labels), list(request.templates))
        deadline = wire.deadline(context)
        async with self.heavy.call(context, deadline) as call:
            return await self._classify(request, labels, templates, deadline, call)

    async def _classify(self, request: pb.ClassifyRequest, labels: list[str],
                        templates: list[str], deadline: float | None, call: HeavyCall
                        ) -> pb.ClassifyResponse:
        top_n = min(request.top_n or DEFAULT_TOP_N, len(labels))
        images: list[tuple[int, bytes]] = []
        ids: dict[int, str] = {}
        for i, item in enumerate(request.inputs):
            kind = item.WhichOneof("input")
            if kind == "image":
                images.append((i, item.image))
            elif kind == "id":
                ids[i] = item.id
            else:
                raise InvalidArgument(f"inputs[{i}] is empty: set image or id", f"inputs[{i}]")
        vectors: dict[int, np.ndarray] = {}
        if ids:
            if not request.collection:
                raise InvalidArgument("inputs name stored ids: set collection", "collection")
            collection = self.collections.get(request.collection)
            collection.check_model(self.model.fingerprint)
            vectors.update(await _stored_vectors(collection, ids, "inputs", call))
        label_vectors = await self._label_vectors(labels, templates, deadline)
        embedded = await self._embed_images([b for _, b in images], deadline)
        errors: dict[int, ClipSearchError] = {}
        for row, (i, _) in enumerate(images):
            if row in embedded.errors:
                errors[i] = embedded.errors[row]
            else:
                vectors[i] = embedded.vectors[row]
        order = sorted(vectors)
        scale = self.logit_scale
        results = []
        if order:
            probs, sims = analysis.zero_shot_probabilities(
                np.stack([vectors[i] for i in order]), label_vectors, scale)
            for i, p, sim in zip(order, probs, sims, strict=True):
                scores = [pb.LabelScore(label=label, probability=float(p[j]),
                                        similarity=float(sim[j]))
                          for j, label in enumerate(labels)]
                top = sorted(range(len(labels)), key=lambda j, p=p: (-p[j], j))[:top_n]
                results.append(pb.Classification(index=i, scores=scores,
                                                  top=[scores[j] for j in top]))
        return pb.ClassifyResponse(results=results, errors=wire.item_errors(errors),
                                   logit_scale=scale)

    @property
    def logit_scale(self) -> float:
        """exp of the model's learned temperature, as open_clip's CLIP.forward applies it."""
        return self.model.logit_scale

    async def _label_vectors(self, labels: list[str], templates: list[str],
                             deadline: float | None) -> np.ndarray:
        """One unit vector per label, from the cache or embedded now (all prompts at once)."""
        cache = self._cache("_analysis_label_cache", LABEL_CACHE_SIZE)
        key = (self.model.fingerprint, tuple(templates))
        out: dict[int, np.ndarray] = {}
        todo = []
        for i, label in enumerate(labels):
            cached = cache.get((*key, label))
            if cached is None:
                todo.append(i)
            else:
                out[i] = cached
        if todo:
            prompts = [t.replace("{}", labels[i]) for i in todo for t in templates]
            embedded = await self._embed_texts(prompts, deadline)
            if embedded.errors:
                row, error = min(embedded.errors.items())
                i = todo[row // len(templates)]
                raise InvalidArgument(f"label {labels[i]!r}: {error}", f"labels[{i}]")
            fresh = analysis.label_embeddings(embedded.vectors, len(todo), len(templates))
            for i, vector in zip(todo, fresh, strict=True):
                out[i] = vector
                cache.put((*key, labels[i]), vector)
        return np.stack([out[i] for i in range(len(labels))])

    def _cache(self, name: str, size: int) -> LruCache:
        """One of the mixin's caches, made on first use (the mixin has no __init__)."""
        cache = self.__dict__.get(name)
        if cache is None:
            cache = self.__dict__.setdefault(name, LruCache(size))
        return cache

    # --- FindDuplicates -------------------------------------------------------------------
    @wire.grpc_errors
    async def FindDuplicates(self, request: pb.FindDuplicatesRequest,
                             context: grpc.aio.ServicerContext) -> pb.FindDuplicatesResponse:
        threshold = (request.threshold if request.HasField("threshold")
                     else DEFAULT_DUPLICATE_THRESHOLD)
        if not 0.0 < threshold <= 1.0:  # NaN fails too
            raise InvalidArgument(f"threshold must be in (0, 1], not {threshold}", "threshold")
        neighbours = (wire.at_most(request.neighbors, MAX_NEIGHBOURS, "neighbors")
                      or DEFAULT_NEIGHBOURS)
        wire.check_ef(request.ef, self.settings.max_ef)
        size = wire.page_size(request.page_size)
        offset = wire.decode_offset_token(request.page_token) if request.page_token else 0
        collection = self.collections.get(request.collection)
        where = wire.where(request, collection)
        ef = request.ef or self.settings.default_ef
        count, reach, limit = collection.info().count, max(ef, neighbours + 1), \
            self.settings.max_duplicates_work
        if count * reach > limit:
            raise ResourceExhausted(
                f"comparing {count} items at ef {reach} is over this server's limit "
                f"(--max-duplicates-work {limit} items x ef): lower ef or neighbors, or narrow "
                "the set with a filter")
        version = collection.cache_version()
        key = (collection.name, id(collection), version, threshold, neighbours, ef,
               request.filter.SerializeToString(deterministic=True))
        cache = self._cache("_analysis_duplicates_cache", DUPLICATES_CACHE_SIZE)
        result = cache.get(key) if version is not None else None
        if result is None:
            async with self.heavy.call(context, wire.deadline(context)) as call:
                result = await call.run(collection.find_duplicates, where, threshold,
                                        neighbours, ef, call.check)
            if version is not None:
                cache.put(key, result)
        # A page past the reply limit ends early; its token continues from there.
        budget = ReplyBudget(self.settings.max_message_bytes)
        groups = []
        for g in result.groups[offset:offset + size]:
            group = pb.DuplicateGroup(
                members=[pb.DuplicateMember(id=result.ids[row], score=score)
                         for row, score in zip(g.members, g.scores, strict=True)],
                min_similarity=g.min_similarity)
            if not budget.fits(group):
                if not groups:
                    raise budget.refusal(0, "groups")
                break
            groups.append(group)
        end = offset + len(groups)
        return pb.FindDuplicatesResponse(
            groups=groups,
            next_page_token=wire.encode_offset_token(end) if end < len(result.groups) else "",
            total_groups=len(result.groups), items_compared=result.compared)

    # --- Cluster --------------------------------------------------------------------------
    @wire.grpc_errors
    async def Cluster(self, request: pb.ClusterRequest, context: grpc.aio.ServicerContext
                      ) -> pb.ClusterResponse:
        n = wire.in_range(request.n_clusters, 2, MAX_CLUSTERS, "n_clusters")
        top_n = wire.at_most(request.top_n, MAX_CENTRAL, "top_n") or DEFAULT_TOP_N
        key = request.metadata_key
        if key and not METADATA_KEY.match(key):
            raise InvalidArgument(f"metadata_key {key!r} must be 1 to 64 letters, digits, '_' "
                                  "or '-'", "metadata_key")
        collection = self.collections.get(request.collection)
        where = wire.where(request, collection)
        count = collection.info().count
        if count * n > self.settings.max_cluster_work:
            raise ResourceExhausted(
                f"{n} clusters of {count} items is over this server's limit (--max-cluster-work "
                f"{self.settings.max_cluster_work} items x clusters): ask for fewer clusters, "
                "or narrow the set with a filter")
        async with self.heavy.call(context, wire.deadline(context)) as call:
            labels, vectors = await call.run(collection.read_vectors, where)
            if n > len(labels):
                raise InvalidArgument(f"n_clusters is {n}, more than the {len(labels)} items "
                                      "to cluster", "n_clusters")
            clustering = await call.run(analysis.kmeans, vectors, n, request.seed, call.check)
            central = analysis.most_central(vectors, clustering.assignment,
                                            clustering.centroids, top_n)
            labelled = 0
            if key:  # written before the hits are read, so the hits show the new labels
                values = dict(zip([_key(k) for k in labels], clustering.assignment.tolist(),
                                  strict=True))
                labelled = await call.run(collection.set_metadata_key, values, key)
            wanted = [_key(labels[r]) for rows, _ in central for r in rows]
            records = await call.run(collection.records_by_key, wanted)
        sizes = np.bincount(clustering.assignment, minlength=n)
        budget = ReplyBudget(self.settings.max_message_bytes)
        groups = []
        for c, (rows, scores) in enumerate(central):
            hits = [pb.Hit(id=r.id, score=float(score), metadata=wire.struct(r.metadata))
                    for row, score in zip(rows.tolist(), scores.tolist(), strict=True)
                    if (r := records.get(_key(labels[row]))) is not None]
            group = pb.ClusterGroup(
                cluster=c, size=int(sizes[c]), central=hits,
                centroid=(wire.vector(clustering.centroids[c]) if request.include_centroids
                          else None))
            budget.add(group, len(groups), "clusters")
            groups.append(group)
        return pb.ClusterResponse(clusters=groups, items_clustered=len(labels),
                                  items_labelled=labelled, inertia=clustering.inertia)


# --- helpers ----------------------------------------------------------------------------------
def _key(value: Any) -> Any:
    """A store key as a plain Python value (numpy integers become ints)."""
    return value.item() if isinstance(value, np.generic) else value


async def _stored_vectors(collection: Collection, ids: dict[int, str], field: str,
                          call: HeavyCall, prefix: str = "") -> dict[int, np.ndarray]:
    """The stored vectors of the items that request positions name, or NotFound naming all
    the missing ids (the field points at the first)."""
    found = await call.run(collection.get, list(ids.values()))
    missing = [(i, id_) for i, id_ in ids.items() if id_ not in found]
    if missing:
        names = ", ".join(repr(id_) for _, id_ in missing)
        raise NotFound(f"{prefix}no item {names} in collection {collection.name!r}",
                       f"{field}[{missing[0][0]}].id")
    return {i: found[id_].vector for i, id_ in ids.items()}


def _check_labels(labels: list[str], templates: list[str]) -> tuple[list[str], list[str]]:
    if len(labels) < 2:
        raise InvalidArgument(f"labels needs at least 2 labels, got {len(labels)}", "labels")
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{len(labels)} labels, over the limit of {MAX_LABELS}", "labels")
    seen: set[str] = set()
    for i, label in enumerate(labels):
        if not label.strip():
            raise InvalidArgument(f"labels[{i}] is empty", f"labels[{i}]")
        if len(label) > MAX_LABEL_CHARS:
            raise InvalidArgument(f"labels[{i}] is {len(label)} characters, over the limit of "
                                  f"{MAX_LABEL_CHARS}", f"labels[{i}]")
        if label in seen:
            raise InvalidArgument(f"labels[{i}] {label!r} is given twice", f"labels[{i}]")
        seen.add(label)
    templates = templates or [DEFAULT_TEMPLATE]
    if len(templates) > MAX_TEMPLATES:
        raise InvalidArgument(f"{len(templates)} templates, over the limit of {MAX_TEMPLATES}",
                              "templates")
    if len(templates) * len(labels) > MAX_PROMPTS:
        raise InvalidArgument(f"{len(labels)} labels x {len(templates)} templates is over the "
                              f"limit of {MAX_PROMPTS} prompts", "templates")
    for i, template in enumerate(templates):
        if template.count("{}") != 1 or template.count("{") != 1 or template.count("}") != 1:
            raise InvalidArgument(f"templates[{i}] {template!r} must hold exactly one '{{}}' "
                                  "(where the label goes) and no other braces",
                                  f"templates[{i}]")
    return labels, templates
