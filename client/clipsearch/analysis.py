"""Client methods beyond search: recommend, classify, find_duplicates and cluster.

A mixin of `clipsearch.Client`: it uses the client's `_call` and `batch_size`, and takes its
helpers from checks.py, errors.py, results.py and images.py, never from client.py (which
imports this module to mix it in).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipsearch.checks import _check_k, _strings
from clipsearch.errors import BatchError, _item_failures
from clipsearch.filters import FilterSpec, to_filter
from clipsearch.images import _check_images, _load_image, _query_image
from clipsearch.results import Hit, _hit, decode_vector, encode_vector
from clipsearch.v1 import clipsearch_pb2 as pb

_STRATEGIES = {
    "average_vector": pb.RECOMMEND_STRATEGY_AVERAGE_VECTOR,
    "best_score": pb.RECOMMEND_STRATEGY_BEST_SCORE,
}

# An example: a stored id (str), a vector (numpy array), an image (bytes, a path, a PIL image),
# or a one-key mapping {"id" | "text" | "image" | "vector": value}.
Example = Any


@dataclass
class LabelScore:
    """One label's probability (softmax over the labels) and cosine similarity for an image."""

    label: str
    probability: float
    similarity: float


@dataclass
class Classification:
    """The zero-shot result for one input: every label in request order, and the best ones."""

    index: int
    scores: list[LabelScore]
    top: list[LabelScore]

    @property
    def probabilities(self) -> dict[str, float]:
        return {s.label: s.probability for s in self.scores}

    @property
    def label(self) -> str:
        """The most probable label."""
        return self.top[0].label


@dataclass
class DuplicateGroup:
    """Items that duplicate each other: (id, similarity to the first member), first first."""

    members: list[tuple[str, float]]
    min_similarity: float

    @property
    def ids(self) -> list[str]:
        return [id_ for id_, _ in self.members]


@dataclass
class Cluster:
    """One k-means cluster: its number, size, most central items and (if asked) centroid."""

    cluster: int
    size: int
    central: list[Hit]
    centroid: np.ndarray | None = None


@dataclass
class Clustering:
    """The result of `Client.cluster`."""

    clusters: list[Cluster]
    items_clustered: int
    items_labelled: int
    inertia: float
    sizes: list[int] = field(default_factory=list)


class AnalysisMixin:
    """recommend, classify, find_duplicates and cluster for `clipsearch.Client`."""

    _call: Any
    batch_size: int

    def recommend(
        self,
        collection: str,
        positives: Sequence[Example],
        negatives: Sequence[Example] = (),
        *,
        k: int = 10,
        strategy: str = "average_vector",
        negative_weight: float | None = None,
        ef: int = 0,
        filter: FilterSpec | pb.Filter | None = None,
        include_vectors: bool = False,
    ) -> list[Hit]:
        """The k items most like ``positives`` and least like ``negatives``, best first.

        An example is a stored id (a str), a vector (numpy array), an image (bytes, a path or a
        PIL image), or ``{"text": ...}`` / ``{"id": ...}`` / ``{"image": ...}`` /
        ``{"vector": ...}``. Examples given by id are never returned. ``strategy`` is
        "average_vector" (one search for the mean of the positives minus ``negative_weight``
        (default 0.5) times the mean of the negatives) or "best_score".
        """
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(_STRATEGIES)}, got {strategy!r}")
        _check_k(k)
        if isinstance(positives, (str, bytes, Mapping)) or isinstance(negatives,
                                                                     (str, bytes, Mapping)):
            raise TypeError("positives and negatives must be sequences of examples")
        request = pb.RecommendRequest(
            collection=collection, k=k, ef=ef, strategy=_STRATEGIES[strategy],
            include_vectors=include_vectors,
            positives=[_example(e, f"positives[{i}]") for i, e in enumerate(positives)],
            negatives=[_example(e, f"negatives[{i}]") for i, e in enumerate(negatives)],
        )
        if negative_weight is not None:
            request.negative_weight = negative_weight
        if filter is not None:
            request.filter.CopyFrom(to_filter(filter))
        response = self._call("Recommend", request)
        return [_hit(h) for h in response.hits]

    def classify(
        self,
        images: Sequence[Any] = (),
        labels: Sequence[str] = (),
        *,
        ids: Sequence[str] = (),
        collection: str | None = None,
        templates: Sequence[str] | None = None,
        top_n: int = 5,
    ) -> list[Classification]:
        """Zero-shot classification of images (paths, bytes, PIL images), then of stored ``ids``
        of ``collection``, against ``labels``; one Classification per input in that order.

        ``templates`` (default ``["a photo of a {}."]``) are averaged per label. Raises
        BatchError when some images failed; its ``results`` has None for them.
        """
        labels = _strings(labels, "labels", "label")
        ids = _strings(ids, "ids", "id")
        templates = _strings(templates or (), "templates", "template")
        checked = _check_images(images)
        if ids and not collection:
            raise ValueError("classifying stored ids needs a collection")
        inputs: list[tuple[str, Any]] = [("image", img) for img in checked]
        inputs += [("id", id_) for id_ in ids]
        results: list[Classification | None] = [None] * len(inputs)
        failures = []
        for start in range(0, len(inputs), self.batch_size):
            batch = inputs[start:start + self.batch_size]
            request = pb.ClassifyRequest(
                collection=collection or "", labels=labels, templates=templates, top_n=top_n,
                inputs=[pb.ClassifyInput(image=_load_image(v)) if kind == "image"
                        else pb.ClassifyInput(id=v) for kind, v in batch])
            response = self._call("Classify", request)
            for r in response.results:
                scores = [LabelScore(s.label, s.probability, s.similarity) for s in r.scores]
                top = [LabelScore(s.label, s.probability, s.similarity) for s in r.top]
                results[start + r.index] = Classification(start + r.index, scores, top)
            failures += _item_failures(response.errors, list(enumerate(batch, start)))
        if failures:
            error = BatchError(failures, len(inputs))
            error.results = results  # type: ignore[attr-defined]
            raise error
        return [r for r in results if r is not None]

    def find_duplicates(
        self,
        collection: str,
        *,
        threshold: float | None = None,
        neighbors: int = 0,
        ef: int = 0,
        filter: FilterSpec | pb.Filter | None = None,
        page_size: int = 0,
    ) -> list[DuplicateGroup]:
        """Every group of near-duplicate items (cosine >= ``threshold``, server default 0.95),
        largest first, fetched a page at a time."""
        return list(self.iter_duplicates(collection, threshold=threshold, neighbors=neighbors,
                                         ef=ef, filter=filter, page_size=page_size))

    def iter_duplicates(
        self,
        collection: str,
        *,
        threshold: float | None = None,
        neighbors: int = 0,
        ef: int = 0,
        filter: FilterSpec | pb.Filter | None = None,
        page_size: int = 0,
    ) -> Iterator[DuplicateGroup]:
        """Like find_duplicates, lazily: one page per request."""
        request = pb.FindDuplicatesRequest(collection=collection, neighbors=neighbors, ef=ef,
                                           page_size=page_size)
        if threshold is not None:
            request.threshold = threshold
        if filter is not None:
            request.filter.CopyFrom(to_filter(filter))
        while True:
            response = self._call("FindDuplicates", request)
            for g in response.groups:
                yield DuplicateGroup([(m.id, float(m.score)) for m in g.members],
                                     float(g.min_similarity))
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def cluster(
        self,
        collection: str,
        n_clusters: int,
        *,
        filter: FilterSpec | pb.Filter | None = None,
        top_n: int = 5,
        seed: int = 0,
        metadata_key: str | None = None,
        include_centroids: bool = False,
    ) -> Clustering:
        """k-means of the collection (or the filtered part) into ``n_clusters`` groups, largest
        first; with ``metadata_key`` every item's metadata gets its cluster number (a write)."""
        request = pb.ClusterRequest(collection=collection, n_clusters=n_clusters, top_n=top_n,
                                    seed=seed, metadata_key=metadata_key or "",
                                    include_centroids=include_centroids)
        if filter is not None:
            request.filter.CopyFrom(to_filter(filter))
        r = self._call("Cluster", request)
        clusters = [Cluster(c.cluster, int(c.size), [_hit(h) for h in c.central],
                            decode_vector(c.centroid) if c.HasField("centroid") else None)
                    for c in r.clusters]
        return Clustering(clusters, int(r.items_clustered), int(r.items_labelled),
                          float(r.inertia), [c.size for c in clusters])


def _example(example: Example, where: str) -> pb.Example:
    if isinstance(example, Mapping):
        if len(example) != 1:
            raise ValueError(f"{where}: a mapping example has exactly one key of id, text, "
                             "image or vector")
        ((kind, value),) = example.items()
        if kind == "id":
            return pb.Example(id=value)
        if kind == "text":
            if not isinstance(value, str):
                raise TypeError(f"{where}: text must be a str")
            return pb.Example(text=value)
        if kind == "image":
            return pb.Example(image=_query_image(value))
        if kind == "vector":
            return pb.Example(vector=encode_vector(value))
        raise ValueError(f"{where}: unknown example kind {kind!r}: use id, text, image or vector")
    if isinstance(example, str):
        return pb.Example(id=example)
    if isinstance(example, np.ndarray):
        return pb.Example(vector=encode_vector(example))
    return pb.Example(image=_query_image(example))

