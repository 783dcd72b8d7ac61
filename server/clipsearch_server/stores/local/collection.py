"""A named collection = durable store + HNSW index, kept in step (the registry of all of them
is registry.py; its whole-collection reads are scans.py).

Lock discipline (one collection):
* writes (upsert, delete) take the index's write lock, commit to the store, then apply the
  same change to the graph, so the graph never runs ahead of the store and never lags it
  while the lock is free;
* searches take the read lock and may run together;
* a snapshot takes the write lock only to start the save: a forked child writes the graph
  as it was then, while searches and writes go on (hnsw.py);
* a compaction builds a fresh graph without the lock from a consistent read of the store,
  then replays the writes that landed meanwhile and swaps graphs under the write lock;
* one snapshot or compaction runs at a time per collection (`_maintenance`).
A write acknowledged to a client is in the store; the graph is rebuilt from the store at start
where a snapshot is missing, damaged, or older than the store.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ...errors import NotFound, storage_error
from ...thumbnails import DEFAULT_THUMBNAIL_SIZE
from ..base import CollectionChecks, CollectionInfo, Duplicates, NewItem, Record, SearchHit
from . import scans
from .hnsw import HnswIndex, SnapshotInvalid, fsync_dir
from .snapshot_child import ChildSaveFailed
from .sql_filters import MATCH_ALL, SqlFilter, compile_filter
from .sqlite import Store

log = logging.getLogger(__name__)

STORE_FILE = "store.sqlite3"
# Rebuild a collection's graph from the store once deletions and replacements since the last
# build exceed this share of its items (and this minimum): churn degrades an HNSW graph.
COMPACT_CHURN_RATIO = 0.5
COMPACT_CHURN_MIN = 1000
# Filtered searches matching at most this many items score them exactly; more walk the graph
# with the filter. Measured at 100k x 512 (bench/RESULTS.md): the graph path costs 50-130 ms
# up to 5 % selectivity, the exact path 4-7 us per matching item; they cross near 8,000.
EXACT_SEARCH_MAX = 8_000
MAX_BOOSTED_EF = 8192


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn a disk-full or unwritable data dir into RESOURCE_EXHAUSTED or UNAVAILABLE."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        mapped = storage_error(exc)
        if mapped is None:
            raise
        log.warning("%s failed: %s", what, exc)
        raise mapped from exc


class Collection(CollectionChecks):
    """One collection's store and graph, kept in step."""

    def __init__(self, folder: Path, store: Store, meta: dict[str, str]) -> None:
        self.folder = folder
        self.name = folder.name
        self.store = store
        self.dim = int(meta["dim"])
        self.model_fingerprint = meta["model_fingerprint"]
        self.created_at = float(meta["created_at"])
        self.thumbnail_size = int(meta.get("thumbnail_size", DEFAULT_THUMBNAIL_SIZE))
        self.index = HnswIndex(folder, self.dim, int(meta["m"]), int(meta["ef_construction"]))
        self._count = store.count()
        self._closed = False
        self._saved_seq: int | None = None  # sequence of the newest snapshot on disk
        # Items written or deleted since the graph on disk: what a restart would replay.
        self._unsaved = self._count
        self.exact_search_max = EXACT_SEARCH_MAX
        self._churn = 0  # deletions and replacements since the graph was last built
        self._maintenance = threading.Lock()  # one snapshot or compaction at a time

    # --- lifecycle ------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, dim: int, fingerprint: str, m: int, ef_construction: int,
               thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE) -> Collection:
        folder.mkdir(parents=True)
        store = Store(folder / STORE_FILE)
        store.write_meta({"dim": str(dim), "model_fingerprint": fingerprint, "m": str(m),
                          "ef_construction": str(ef_construction),
                          "created_at": repr(time.time()),
                          "thumbnail_size": str(thumbnail_size)})
        fsync_dir(folder.parent)
        return cls(folder, store, store.read_meta())

    @classmethod
    def open(cls, folder: Path) -> Collection:
        store = Store(folder / STORE_FILE)
        collection = cls(folder, store, store.read_meta())
        collection._recover_index()
        return collection

    def _recover_index(self) -> None:
        """Load the snapshot and replay what the store has beyond it, or rebuild."""
        started = time.perf_counter()
        with self.index.lock.write():
            store_seq = self.store.seq
            try:
                manifest = self.index.load()
                if manifest.seq > store_seq:
                    raise SnapshotInvalid(
                        f"snapshot covers sequence {manifest.seq}, ahead of the store's {store_seq}"
                    )
                how = "loaded snapshot" if manifest.seq == store_seq else "loaded snapshot + replay"
                self._saved_seq = manifest.seq
            except SnapshotInvalid as exc:
                if store_seq > 0:
                    log.warning("collection %s: %s; rebuilding the index from the store",
                                self.name, exc)
                self.index.reset()
                how = "rebuilt from store"
            self._unsaved = self._replay_after(self.index.seq)
            self.index.seq = store_seq
        log.info("collection %s: %d items, %s in %.2fs", self.name, self._count, how,
                 time.perf_counter() - started)

    def _replay_after(self, seq: int) -> int:
        """Apply the store's changes after `seq` to the graph; returns how many."""
        replayed = 0
        for labels, vectors in self.store.changes_after(seq):
            self.index.add(labels, vectors)
            replayed += len(labels)
        deleted = self.store.deletions_after(seq)
        self.index.delete(deleted)
        return replayed + len(deleted)

    def compact_if_churned(self) -> bool:
        """Rebuild the graph from the store when churn has degraded it; True when rebuilt.

        The new graph is built without holding the lock, from a consistent read of the store;
        the writes that land meanwhile are replayed onto it under the write lock, then it
        replaces the old one. Searches and writes go on during the (long) build.
        """
        with self._maintenance:
            with self.index.lock.read():
                if self._closed or self._churn < max(COMPACT_CHURN_MIN,
                                                     COMPACT_CHURN_RATIO * self._count):
                    return False
                seq, churn = self.index.seq, self._churn
                chunks = list(self.store.changes_after(-1))
            started = time.perf_counter()
            fresh = HnswIndex(self.folder, self.dim, self.index.m, self.index.ef_construction)
            for labels, vectors in chunks:
                if self._closed:  # shutting down: the graph in hand serves until the end
                    return False
                fresh.add(labels, vectors)
            with self.index.lock.write():
                if self._closed:
                    return False
                for labels, vectors in self.store.changes_after(seq):
                    fresh.add(labels, vectors)
                fresh.delete(self.store.deletions_after(seq))
                fresh.seq = self.index.seq
                self.index.adopt(fresh)
                self._churn -= churn
                self._saved_seq = None  # the graph on disk is the old one
            log.info("collection %s: graph rebuilt from the store after %d deletions and "
                     "replacements, in %.1fs", self.name, churn, time.perf_counter() - started)
            return True

    def changed(self) -> bool:
        """True when the graph differs from the newest snapshot on disk (or there is none)."""
        return self._saved_seq != self.index.seq

    def unsaved(self) -> int:
        """Items written or deleted since the newest snapshot: what a restart would replay."""
        return self._unsaved

    def snapshot(self, force: bool = False, in_child: bool | None = None,
                 wait: bool = True) -> bool:
        """Save the graph if it changed since the last snapshot; True when saved.

        `in_child` False writes the file in this process (no fork), None as HnswIndex decides.
        `wait` False gives up at once when a snapshot or compaction of this collection is
        already under way.
        """
        if not self._maintenance.acquire(blocking=wait):
            return False
        try:
            return self._snapshot(force, in_child)
        finally:
            self._maintenance.release()

    def _snapshot(self, force: bool, in_child: bool | None) -> bool:
        with self.index.lock.write():
            if self._closed:
                return False
            if not force and self._saved_seq == self.index.seq:
                return False
            covered = self._unsaved
            pending = self.index.begin_save(in_child)
        try:
            manifest = self.index.finish_save(pending)
        except ChildSaveFailed as exc:  # forking a gRPC server is not always safe
            log.warning("collection %s: %s; saving in-process instead", self.name, exc)
            with self.index.lock.write():
                if self._closed:
                    return False
                manifest = self.index.finish_save(self.index.begin_save(in_child=False))
        except OSError:
            if self._closed:  # dropped meanwhile: its folder is gone, nothing to save
                return False
            raise
        with self.index.lock.write():
            if self._closed:
                return False
            self._saved_seq = manifest.seq
            self._unsaved -= covered
        self.store.forget_deletions_through(manifest.seq)
        return True

    def close(self) -> None:
        with self.index.lock.write():
            self._closed = True
            self.store.close()

    def _check_open(self) -> None:
        if self._closed:
            raise NotFound(f"collection {self.name!r} was dropped")

    # --- operations ---------------------------------------------------------------------
    def info(self) -> CollectionInfo:
        return CollectionInfo(self.name, self._count, self.dim, self.model_fingerprint,
                              self.index.m, self.index.ef_construction, self.created_at,
                              self.thumbnail_size)

    def count(self) -> int:
        return self._count

    def upsert(self, items: list[NewItem]) -> int:
        if not items:
            return 0
        for item in items:
            self.check_vector(item.vector)
        with self.index.lock.write():
            self._check_open()
            with writing(f"upsert into {self.name}"):
                seq, labels, created = self.store.upsert(items)
            # The store applies a batch in order; for an id repeated in one batch the last wins.
            last = {item.id: (label, item.vector)
                    for item, label in zip(items, labels, strict=True)}
            self.index.add(np.array([lv[0] for lv in last.values()], dtype=np.int64),
                           np.stack([lv[1] for lv in last.values()]))
            self.index.seq = seq
            self._count += created
            self._churn += len(last) - created  # ids that existed were replaced
            self._unsaved += len(last)
        return len(items)

    def delete(self, ids: list[str]) -> int:
        with self.index.lock.write():
            self._check_open()
            with writing(f"delete from {self.name}"):
                seq, labels = self.store.delete(ids)
            self.index.delete(labels)
            self.index.seq = seq
            self._count -= len(labels)
            self._churn += len(labels)
            self._unsaved += len(labels)
        return len(labels)

    def set_metadata_key(self, values: dict[int, object], key: str) -> int:
        """Set one metadata key of these labels; the graph is unchanged. Returns items changed."""
        with self.index.lock.write():
            self._check_open()
            seq, changed = self.store.set_metadata_key(values, key)
            self.index.seq = seq
        return changed

    def get(self, ids: list[str]) -> dict[str, Record]:
        with self.index.lock.read():
            self._check_open()
            return self.store.get_by_ids(ids)

    def thumbnails(self, ids: list[str]) -> dict[str, bytes]:
        with self.index.lock.read():
            self._check_open()
            return self.store.thumbnails(ids)

    def search(self, vector: np.ndarray, k: int, ef: int, where: SqlFilter = MATCH_ALL
               ) -> list[SearchHit]:
        """The true top k among matching items when the matching set is small (an exact scan),
        the graph's approximate top k otherwise."""
        self.check_vector(vector)
        with self.index.lock.read():
            self._check_open()
            if where is MATCH_ALL:
                candidates, total = None, self._count
            else:
                candidates = self.store.labels_matching(where)
                total = len(candidates)
            k = min(k, total)
            if k == 0:
                return []
            if candidates is not None and total <= self.exact_search_max:
                labels, scores = scans.exact_search(self.store, vector, k, candidates)
            else:
                allowed = None if candidates is None else set(candidates.tolist())
                # A filter passing a fraction of items needs a longer candidate list.
                boost = 1.0 if candidates is None else self._count / total
                try:
                    labels, scores = self.index.search(
                        vector, k, min(int(max(ef, k) * boost), MAX_BOOSTED_EF), allowed)
                except RuntimeError:
                    # hnswlib reached fewer than k matching items: scan them exactly.
                    if candidates is None:
                        candidates = self.store.labels_matching(MATCH_ALL)
                    labels, scores = scans.exact_search(self.store, vector, k, candidates)
            records = self.store.get_by_labels(labels.tolist())
        return [SearchHit(r.id, float(s), r.metadata, r.vector)
                for label, s in zip(labels.tolist(), scores.tolist(), strict=True)
                if (r := records.get(label)) is not None]

    def count_matching(self, where: SqlFilter) -> int:
        if where is MATCH_ALL:
            return self._count
        with self.index.lock.read():
            self._check_open()
            return self.store.count_matching(where)

    def page(self, where: SqlFilter, after_id: str | None, limit: int) -> list[Record]:
        with self.index.lock.read():
            self._check_open()
            return self.store.page(where, after_id, limit)

    # --- whole-collection reads (analysis RPCs) ------------------------------------------
    def compile_filter(self, tree: object) -> SqlFilter:
        return compile_filter(tree)

    def read_vectors(self, where: SqlFilter) -> tuple[np.ndarray, np.ndarray]:
        with self._reading():
            return scans.read_vectors(self.store, self.index, where)

    def records_by_key(self, keys: list[int]) -> dict[int, Record]:
        with self._reading():
            return scans.records_by_label(self.store, self.index, keys)

    def find_duplicates(self, where: SqlFilter, threshold: float, neighbours: int, ef: int,
                        check: Callable[[], None]) -> Duplicates:
        with self._reading():
            return scans.find_duplicates(self.store, self.index, where, threshold, neighbours,
                                         ef, check, self.exact_search_max)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A whole-collection read that finds the store closed under it: NOT_FOUND."""
        try:
            yield
        except sqlite3.ProgrammingError:
            raise NotFound(f"collection {self.name!r} was dropped") from None

    def cache_version(self) -> int:
        return self.index.seq
