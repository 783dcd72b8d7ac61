"""The local store's whole-collection reads for the analysis RPCs: every matching vector,
and graph neighbours of all of them (near-duplicates).

The neighbour queries take the collection's read lock a chunk at a time, so a write waiting
for the lock (and the searches queued behind it) is held up only briefly.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .. import analysis
from ..errors import NotFound
from ..filters import MATCH_ALL, SqlFilter
from ..store import Record
from .base import Duplicates

if TYPE_CHECKING:
    from .local import Collection

NEIGHBOUR_CHUNK = 4096  # most rows per batched graph query
# Rows x ef per chunk: a chunk takes about a second even at ef 4096, so a cancelled call stops
# within about that long.
CHUNK_WORK = 1 << 19


def read_vectors(collection: Collection, where: SqlFilter) -> tuple[np.ndarray, np.ndarray]:
    """(labels ascending, their vectors) of the matching items, read consistently."""
    try:
        with collection.index.lock.read():
            if where is MATCH_ALL:
                chunks = list(collection.store.changes_after(-1))
                if not chunks:
                    return np.zeros(0, np.int64), np.zeros((0, collection.dim), np.float32)
                return (np.concatenate([c[0] for c in chunks]),
                        np.concatenate([c[1] for c in chunks]).astype(np.float32))
            labels = collection.store.labels_matching(where)
            vectors = collection.store.vectors_for(labels)
            return labels, vectors.reshape(len(labels), collection.dim)
    except sqlite3.ProgrammingError:  # closed under us
        raise NotFound(f"collection {collection.name!r} was dropped") from None


def records_by_label(collection: Collection, labels: list[int]) -> dict[int, Record]:
    try:
        with collection.index.lock.read():
            return collection.store.get_by_labels(labels)
    except sqlite3.ProgrammingError:
        raise NotFound(f"collection {collection.name!r} was dropped") from None


def find_duplicates(collection: Collection, where: SqlFilter, threshold: float,
                     neighbours: int, ef: int, check: Callable[[], None]) -> Duplicates:
    """Each matching item's nearest neighbours from the graph, joined into groups; `check`
    runs between chunks of queries."""
    labels, vectors = read_vectors(collection, where)
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
            with collection.index.lock.read():
                found[part], sims[part] = collection.index.neighbours(vectors[part], k, ef,
                                                                      threads, allowed)
    except RuntimeError:
        # hnswlib reached fewer than k items for some row (a small filtered part): score the
        # part exactly, as Search does for small filtered sets.
        if len(labels) > collection.exact_search_max:
            raise
        found, sims = _exact_neighbours(labels, vectors, k)
    rows = np.searchsorted(labels, found)
    rows = np.where((rows < len(labels)) & (labels[np.minimum(rows, len(labels) - 1)] == found),
                    rows, -1)
    groups = analysis.duplicate_groups(vectors, rows, sims.astype(np.float32), threshold)
    members = sorted({row for g in groups for row in g.members})
    records = records_by_label(collection, [int(labels[r]) for r in members])
    ids = {row: records[int(labels[row])].id for row in members
           if int(labels[row]) in records}
    groups = [g for g in groups if all(row in ids for row in g.members)]  # deleted meanwhile
    return Duplicates(groups, ids, len(labels))


def _exact_neighbours(labels: np.ndarray, vectors: np.ndarray, k: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    sims = vectors @ vectors.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return labels[top], np.take_along_axis(sims, top, axis=1)
