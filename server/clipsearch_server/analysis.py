"""The maths behind Recommend, Classify, FindDuplicates and Cluster: numpy in, numpy out.

Nothing here knows about gRPC, SQLite or the graph, so each piece is tested on placed vectors.
Vectors are unit length float32 rows throughout: a dot product is a cosine similarity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


def normalize(vector: np.ndarray) -> np.ndarray:
    """`vector` scaled to unit length; ValueError when it has none to scale."""
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm < 1e-12:
        raise ValueError("the combined vector has zero length")
    return (vector / norm).astype(np.float32)


# --- Recommend -------------------------------------------------------------------------------
def average_vector_query(positives: np.ndarray, negatives: np.ndarray,
                         negative_weight: float) -> np.ndarray:
    """normalize(mean(positives) - negative_weight * mean(negatives)), the Rocchio-style query.

    Raises ValueError when the negatives cancel the positives exactly.
    """
    query = positives.mean(axis=0)
    if len(negatives):
        query = query - negative_weight * negatives.mean(axis=0)
    return normalize(query)


def best_scores(candidates: np.ndarray, positives: np.ndarray, negatives: np.ndarray
                ) -> np.ndarray:
    """Each candidate's score: its best similarity to a positive when that beats its best to a
    negative, else minus the best negative similarity squared (always below any positive score
    of a candidate that won, so winners rank first).
    """
    best_positive = (candidates @ positives.T).max(axis=1)
    if not len(negatives):
        return best_positive
    best_negative = (candidates @ negatives.T).max(axis=1)
    return np.where(best_positive > best_negative, best_positive, -best_negative ** 2)


# --- Classify --------------------------------------------------------------------------------
def label_embeddings(prompt_vectors: np.ndarray, n_labels: int, n_templates: int) -> np.ndarray:
    """One unit vector per label: the normalised mean of its prompts' unit embeddings.

    `prompt_vectors` holds each label's prompts together (label-major), as open_clip's
    `build_zero_shot_classifier` builds them.
    """
    per_label = prompt_vectors.reshape(n_labels, n_templates, -1).mean(axis=1)
    return (per_label / np.linalg.norm(per_label, axis=1, keepdims=True)).astype(np.float32)


def zero_shot_probabilities(images: np.ndarray, labels: np.ndarray, logit_scale: float
                            ) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, similarities), one row per image: softmax(logit_scale * cosine)."""
    similarities = images.astype(np.float64) @ labels.astype(np.float64).T
    logits = logit_scale * similarities
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True), similarities


# --- FindDuplicates ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DuplicateGroup:
    """Row positions of a group's members (first: the anchor) and each one's similarity to it."""

    members: list[int]
    scores: list[float]
    min_similarity: float


def duplicate_groups(vectors: np.ndarray, neighbours: np.ndarray, similarities: np.ndarray,
                     threshold: float) -> list[DuplicateGroup]:
    """Connected groups of rows joined by neighbour pairs at or above `threshold`.

    `neighbours[i]` are row positions of row i's nearest neighbours (-1 where none) and
    `similarities[i]` their cosine similarities. The anchor of a group is its member with the
    most qualifying pairs (ties: the earlier row); members follow by similarity to it.
    Groups come largest first, ties by the anchor's row.
    """
    n = len(vectors)
    rows = np.repeat(np.arange(n), neighbours.shape[1])
    cols = neighbours.reshape(-1)
    sims = similarities.reshape(-1)
    keep = (cols >= 0) & (cols != rows) & (sims >= threshold)
    rows, cols, sims = rows[keep], cols[keep], sims[keep]
    # each pair once, as (low, high)
    low, high = np.minimum(rows, cols), np.maximum(rows, cols)
    pairs, first = np.unique(np.stack([low, high], axis=1), axis=0, return_index=True)
    sims = sims[first]
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    degree = np.bincount(pairs.reshape(-1), minlength=n) if len(pairs) else np.zeros(n, int)
    members: dict[int, list[int]] = {}
    for i in np.flatnonzero(degree).tolist():
        members.setdefault(root(i), []).append(i)
    min_sim: dict[int, float] = {}
    for (a, _), s in zip(pairs.tolist(), sims.tolist(), strict=True):
        r = root(a)
        min_sim[r] = min(min_sim.get(r, 1.0), s)
    groups = []
    for r, rows_of in members.items():
        anchor = min(rows_of, key=lambda i: (-degree[i], i))
        scores = vectors[rows_of] @ vectors[anchor]
        order = sorted(range(len(rows_of)),
                       key=lambda j: (rows_of[j] != anchor, -scores[j], rows_of[j]))
        groups.append(DuplicateGroup(
            members=[rows_of[j] for j in order],
            scores=[1.0 if rows_of[j] == anchor else float(scores[j]) for j in order],
            min_similarity=min(float(min_sim[r]), 1.0)))
    groups.sort(key=lambda g: (-len(g.members), g.members[0]))
    return groups


# --- Cluster ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clustering:
    """Cluster number per row (largest cluster 0), unit centroids, and k-means' inertia."""

    assignment: np.ndarray
    centroids: np.ndarray
    inertia: float


def import_libraries() -> None:
    """Import scikit-learn's k-means ahead of the first Cluster call."""
    import sklearn.cluster  # noqa: F401


KMEANS_MAX_ITER = 300  # scikit-learn's default
KMEANS_STEP_WORK = 1 << 25  # items x clusters x iterations between two stop checks


def kmeans(vectors: np.ndarray, n_clusters: int, seed: int,
           check: Callable[[], None] = lambda: None) -> Clustering:
    """scikit-learn's k-means (k-means++ start, one run) on unit vectors, renumbered by size.

    Lloyd's iterations run a few at a time, each step starting from the last one's centres
    (the same iterations one long run makes), with `check` between steps so that a call
    nobody waits for stops within about a second.
    """
    from sklearn.cluster import KMeans, kmeans_plusplus  # imported here: only Cluster needs it

    centers, _ = kmeans_plusplus(vectors, n_clusters, random_state=seed)
    step = max(1, min(20, KMEANS_STEP_WORK // max(1, len(vectors) * n_clusters)))
    done = 0
    while True:
        check()
        model = KMeans(n_clusters=n_clusters, init=centers, n_init=1,
                       max_iter=min(step, KMEANS_MAX_ITER - done))
        assignment = model.fit_predict(vectors)
        centers = model.cluster_centers_
        done += model.n_iter_
        if model.n_iter_ < step or done >= KMEANS_MAX_ITER:
            break
    sizes = np.bincount(assignment, minlength=n_clusters)
    order = np.lexsort((np.arange(n_clusters), -sizes))  # largest first, then old number
    renumber = np.empty(n_clusters, dtype=np.int64)
    renumber[order] = np.arange(n_clusters)
    centroids = model.cluster_centers_[order].astype(np.float32)
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    centroids = centroids / np.where(norms > 0, norms, 1.0)
    return Clustering(renumber[assignment], centroids, float(model.inertia_))


def most_central(vectors: np.ndarray, assignment: np.ndarray, centroids: np.ndarray, top_n: int
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per cluster, (row positions, similarities) of its top_n rows nearest the centroid."""
    central = []
    for c, centroid in enumerate(centroids):
        rows = np.flatnonzero(assignment == c)
        scores = vectors[rows] @ centroid
        take = min(top_n, len(rows))
        if take == 0:
            central.append((rows[:0], scores[:0]))
            continue
        top = np.argpartition(-scores, take - 1)[:take]
        top = top[np.lexsort((rows[top], -scores[top]))]
        central.append((rows[top], scores[top]))
    return central


BEST_SCORE_POOL = 64  # BEST_SCORE looks at this many of each positive's nearest items (>= k)


def best_score_hits(search: Callable[[np.ndarray, int, int], list], positives: np.ndarray,
                    negatives: np.ndarray, k: int, ef: int, exclude: set[str],
                    check: Callable[[], None] = lambda: None) -> list[tuple[Any, float]]:
    """Candidates near each positive (`search(vector, k, ef)` gives hits with .id and
    .vector), scored by best_scores, best first; ties go to the smaller id."""
    pool = max(k, BEST_SCORE_POOL) + len(exclude)
    candidates: dict[str, Any] = {}
    for positive in positives:
        check()
        for hit in search(positive, pool, max(ef, pool)):
            if hit.id not in exclude:
                candidates.setdefault(hit.id, hit)
    if not candidates:
        return []
    hits = list(candidates.values())
    scores = best_scores(np.stack([h.vector for h in hits]), positives, negatives)
    order = sorted(range(len(hits)), key=lambda i: (-scores[i], hits[i].id))[:k]
    return [(hits[i], float(scores[i])) for i in order]
