"""The local store's reads that score or return many items: the exact top k of a small
filtered set, every matching vector, and graph neighbours of all of them (near-duplicates).

Functions of a collection's store and graph, which the collection (collection.py) passes in.
The neighbour queries take the graph's read lock a chunk at a time, so a write waiting for the
lock (and the searches queued behind it) is held up only briefly. A store closed under a read
raises sqlite3.ProgrammingError, which the collection reports as NOT_FOUND.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from ... import analysis
from ..base import Duplicates, Record
from .hnsw import HnswIndex
from .sql_filters import MATCH_ALL, SqlFilter
from .sqlite import Store

NEIGHBOUR_CHUNK = 4096  # most rows per batched graph query
# Rows x ef per chunk: a chunk takes about a second even at ef 4096, so a cancelled call stops
# within about that long.
CHUNK_WORK = 1 << 19


def exact_search(store: Store, vector: np.ndarray, k: int, labels: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(labels, similarities) of the true top k among `labels`, best first."""
    scores = store.vectors_for(labels) @ vector
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    top = top[np.argsort(-scores[top], kind="stable")]
    return labels[top], scores[top]


def read_vectors(store: Store, index: HnswIndex, where: SqlFilter
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(labels ascending, their vectors) of the matching items, read consistently."""
    with index.lock.read():
        if where is MATCH_ALL:
            chunks = list(store.changes_after(-1))
            if not chunks:
                return np.zeros(0, np.int64), np.zeros((0, index.dim), np.float32)
            return (np.concatenate([c[0] for c in chunks]),
                    np.concatenate([c[1] for c in chunks]).astype(np.float32))
        labels = store.labels_matching(where)
        vectors = store.vectors_for(labels)
        return labels, vectors.reshape(len(labels), index.dim)


def records_by_label(store: Store, index: HnswIndex, labels: list[int]) -> dict[int, Record]:
    with index.lock.read():
        return store.get_by_labels(labels)


def find_duplicates(store: Store, index: HnswIndex, where: SqlFilter, threshold: float,
                    neighbours: int, ef: int, check: Callable[[], None], exact_max: int
                    ) -> Duplicates:
    """Each matching item's nearest neighbours from the graph, joined into groups; `check`
    runs between chunks of queries. A matching set of at most `exact_max` items that the
    graph cannot serve is scored exactly."""
    labels, vectors = read_vectors(store, index, where)
    if len(labels) < 2:
        return Duplicates([], {}, len(labels))
    k = min(neighbours + 1, len(labels))  # +1: an item is its own nearest
    allowed = None if where is MATCH_ALL else set(labels.tolist())
    # One core is left to queries (the graph's threads are heavy work: heavy_work.py).
    threads = 1 if allowed is not None else max(1, min(4, (os.cpu_count() or 1) - 1))
    try:
        found = np.empty((len(labels), k), np.int64)
        sims = np.empty((len(labels), k), np.float32)
        # In chunks, each under the read lock: a waiting write holds up searches only briefly.
        chunk = max(16, min(NEIGHBOUR_CHUNK, CHUNK_WORK // max(ef, k)))
        for start in range(0, len(labels), chunk):
            check()
            part = slice(start, start + chunk)
            with index.lock.read():
                found[part], sims[part] = index.neighbours(vectors[part], k, ef, threads,
                                                           allowed)
    except RuntimeError:
        # hnswlib reached fewer than k items for some row (a small filtered part): score the
        # part exactly, as Search does for small filtered sets.
        if len(labels) > exact_max:
            raise
        found, sims = _exact_neighbours(labels, vectors, k)
    rows = np.searchsorted(labels, found)
    rows = np.where((rows < len(labels)) & (labels[np.minimum(rows, len(labels) - 1)] == found),
                    rows, -1)
    groups = analysis.duplicate_groups(vectors, rows, sims.astype(np.float32), threshold)
    members = sorted({row for g in groups for row in g.members})
    records = records_by_label(store, index, [int(labels[r]) for r in members])
    ids = {row: records[int(labels[row])].id for row in members
           if int(labels[row]) in records}
    groups = [g for g in groups if all(row in ids for row in g.members)]  # deleted meanwhile
    return Duplicates(groups, ids, len(labels))


def _exact_neighbours(labels: np.ndarray, vectors: np.ndarray, k: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    sims = vectors @ vectors.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return labels[top], np.take_along_axis(sims, top, axis=1)
