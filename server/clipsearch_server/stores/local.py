"""A named collection = durable store + HNSW index, and the registry of all of them.

Lock discipline (one collection):
* writes (upsert, delete) take the index's write lock, commit to the store, then apply the
  same change to the graph, so the graph never runs ahead of the store and never lags it
  while the lock is free;
* searches take the read lock and may run together;
* a snapshot takes the write lock only to start the save: a forked child writes the graph
  as it was then, while searches and writes go on (index.py);
* a compaction builds a fresh graph without the lock from a consistent read of the store,
  then replays the writes that landed meanwhile and swaps graphs under the write lock;
* one snapshot or compaction runs at a time per collection (`_maintenance`).
A write acknowledged to a client is in the store; the graph is rebuilt from the store at start
where a snapshot is missing, damaged, or older than the store.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import AlreadyExists, NotFound, Unavailable, storage_error
from ..filters import MATCH_ALL, SqlFilter, compile_filter
from ..index import ChildSaveFailed, HnswIndex, SnapshotInvalid, fsync_dir
from ..store import NewItem, Record, Store
from ..thumbnails import DEFAULT_THUMBNAIL_SIZE
from . import local_scans
from .base import (
    NAME_PATTERN,
    CollectionInfo,
    Duplicates,
    SearchHit,
    check_model,
    check_name,
    check_vector,
)

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
# Threads that save graphs and close stores at shutdown: hnswlib's save holds the GIL, but the
# fsyncs around it (graph file, manifest, folder, the store's last checkpoint) overlap.
SHUTDOWN_THREADS = 8


@contextlib.contextmanager
def _writing(what: str) -> Iterator[None]:
    """Turn a disk-full or unwritable data dir into RESOURCE_EXHAUSTED or UNAVAILABLE."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        mapped = storage_error(exc)
        if mapped is None:
            raise
        log.warning("%s failed: %s", what, exc)
        raise mapped from exc


class Collection:
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
            with _writing(f"upsert into {self.name}"):
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
            with _writing(f"delete from {self.name}"):
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
                labels, scores = self._exact_search(vector, k, candidates)
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
                    labels, scores = self._exact_search(vector, k, candidates)
            records = self.store.get_by_labels(labels.tolist())
        return [SearchHit(r.id, float(s), r.metadata, r.vector)
                for label, s in zip(labels.tolist(), scores.tolist(), strict=True)
                if (r := records.get(label)) is not None]

    def _exact_search(self, vector: np.ndarray, k: int, labels: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
        scores = self.store.vectors_for(labels) @ vector
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return labels[top], scores[top]

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

    def check_vector(self, vector: np.ndarray) -> None:
        check_vector(self.name, self.dim, vector)

    def check_model(self, fingerprint: str) -> None:
        check_model(self.name, self.model_fingerprint, fingerprint)

    # --- whole-collection reads (analysis RPCs) ------------------------------------------
    def compile_filter(self, tree: object) -> SqlFilter:
        return compile_filter(tree)

    def read_vectors(self, where: SqlFilter) -> tuple[np.ndarray, np.ndarray]:
        return local_scans.read_vectors(self, where)

    def records_by_key(self, keys: list[int]) -> dict[int, Record]:
        return local_scans.records_by_label(self, keys)

    def find_duplicates(self, where: SqlFilter, threshold: float, neighbours: int, ef: int,
                        check: Callable[[], None]) -> Duplicates:
        return local_scans.find_duplicates(self, where, threshold, neighbours, ef, check)

    def cache_version(self) -> int:
        return self.index.seq


class Collections:
    """All collections under `<data_dir>/collections`, opened at start."""

    def __init__(self, data_dir: Path, dim: int, fingerprint: str, m: int, ef_construction: int
                 ) -> None:
        self.root = data_dir / "collections"
        self.dim = dim
        self.fingerprint = fingerprint
        self.m = m
        self.ef_construction = ef_construction
        self._lock = threading.Lock()
        self._open: dict[str, Collection] = {}
        # Collections whose files could not be opened at start: name -> reason. Left on disk,
        # not served; a restart tries them again.
        self.unavailable: dict[str, str] = {}
        self._stopping = False  # shutting down: background snapshot rounds stop

    def open_all(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".dropped-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or not NAME_PATTERN.fullmatch(folder.name):
                continue
            try:
                if self._never_created(folder):
                    # a create killed before its settings were committed: never acknowledged
                    log.warning("removing %s: its creation never completed", folder.name)
                    shutil.rmtree(folder, ignore_errors=True)
                    continue
                self._open[folder.name] = Collection.open(folder)
            except Exception as exc:  # anything else: keep the files, serve the others
                reason = f"{type(exc).__name__}: {exc}"
                self.unavailable[folder.name] = reason
                log.error("collection %s is unavailable, its files are left untouched: %s",
                          folder.name, reason)

    @staticmethod
    def _never_created(folder: Path) -> bool:
        """True only for a folder whose store provably never committed its settings."""
        store = folder / STORE_FILE
        if not store.exists():
            if any(folder.iterdir()):
                raise FileNotFoundError(f"{STORE_FILE} is missing but the folder is not empty")
            return True  # created and killed before the store appeared
        return "dim" not in Store.peek_meta(store)  # raises when the store cannot be read

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._open)

    def find(self, name: str) -> Collection | None:
        """The open collection of that name, or None."""
        with self._lock:
            return self._open.get(name)

    def get(self, name: str) -> Collection:
        with self._lock:
            collection = self._open.get(name)
        if collection is None:
            check_name(name)
            self._check_available(name)
            raise NotFound(f"collection {name!r} does not exist")
        return collection

    def _check_available(self, name: str) -> None:
        reason = self.unavailable.get(name)
        if reason is not None:
            raise Unavailable(f"collection {name!r} could not be opened at start ({reason}); "
                              "its files are kept: fix the cause and restart the server")

    def create(self, name: str, m: int = 0, ef_construction: int = 0, exist_ok: bool = False,
               thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE) -> Collection:
        check_name(name)
        with self._lock:
            if name in self._open:
                if exist_ok:
                    return self._open[name]
                raise AlreadyExists(f"collection {name!r} already exists")
            self._check_available(name)
            try:
                with _writing(f"create collection {name}"):
                    collection = Collection.create(
                        self.root / name, self.dim, self.fingerprint, m or self.m,
                        ef_construction or self.ef_construction, thumbnail_size)
            except BaseException:
                # never acknowledged: leave no half-made folder to trip the next create
                shutil.rmtree(self.root / name, ignore_errors=True)
                raise
            self._open[name] = collection
            log.info("created collection %s (dim %d, model %s)", name, self.dim, self.fingerprint)
            return collection

    def drop(self, name: str) -> bool:
        check_name(name)
        with self._lock:
            collection = self._open.pop(name, None)
            if collection is None:
                self._check_available(name)
                return False
            trash = self.root / f".dropped-{name}-{uuid.uuid4().hex}"
            try:
                with _writing(f"drop collection {name}"):
                    collection.folder.rename(trash)
                    fsync_dir(self.root)
            except BaseException:
                if collection.folder.exists():  # not moved: it goes on being served
                    self._open[name] = collection
                    raise
                # moved, only the directory sync failed: the drop stands
            collection.close()
        shutil.rmtree(trash, ignore_errors=True)
        log.info("dropped collection %s", name)
        return True

    def describe(self) -> str:
        return f"SQLite + hnswlib under {self.root}"

    def counts(self) -> list[tuple[str, int]]:
        """(name, items) of every collection, for metrics."""
        with self._lock:
            return [(name, c.count()) for name, c in sorted(self._open.items())]

    def snapshot_all(self, force: bool = False, budget_s: float | None = None) -> None:
        """Rebuild churned graphs, then save every changed one.

        With `budget_s` (shutting down, nothing is served any more): no rebuilds, and the graphs
        are written in-process by a few threads (a forked child per graph, at idle priority,
        is there only to spare the serving threads), those with the most unsaved changes first;
        none starts after `budget_s` seconds. A collection left unsaved loses nothing: its
        store has every write, and the next start replays what its older snapshot lacks.
        """
        if budget_s is not None:
            self._stopping = True  # a background round still going stops at its next collection
            self._save_for_shutdown(budget_s)
            return
        with self._lock:
            collections = list(self._open.values())
        for collection in collections:
            if self._stopping:
                return
            try:
                collection.compact_if_churned()
                if collection.snapshot(force):
                    log.debug("snapshot of %s saved", collection.name)
            except Exception:
                log.exception("snapshot of collection %s failed", collection.name)

    def _save_for_shutdown(self, budget_s: float) -> None:
        started = time.monotonic()
        deadline = started + budget_s
        with self._lock:
            changed = [c for c in self._open.values() if c.changed()]
        if not changed:
            return
        changed.sort(key=lambda c: c.unsaved(), reverse=True)

        def save(collection: Collection) -> bool | None:
            if time.monotonic() >= deadline:
                return None  # out of time: replayed from the store at the next start
            try:
                # no wait: one a background round is saving or rebuilding is left as it is
                return collection.snapshot(in_child=False, wait=False)
            except Exception:
                log.exception("snapshot of collection %s failed", collection.name)
                return False

        with ThreadPoolExecutor(min(SHUTDOWN_THREADS, len(changed)),
                                thread_name_prefix="shutdown-snapshot") as pool:
            results = list(pool.map(save, changed))
        left = [c for c, saved in zip(changed, results, strict=True) if not saved]
        log.info("saved %d of %d changed indexes in %.1fs%s", len(changed) - len(left),
                 len(changed), time.monotonic() - started,
                 f"; {len(left)} ({sum(c.unsaved() for c in left)} items written since their "
                 "last snapshot) will be replayed from their stores at the next start"
                 if left else "")

    def close_all(self) -> None:
        with self._lock:
            collections = list(self._open.values())
            self._open.clear()
        if len(collections) < 2:
            for collection in collections:
                collection.close()
            return
        # Each close checkpoints the store's WAL into its database (fsyncs): a few at a time.
        with ThreadPoolExecutor(min(SHUTDOWN_THREADS, len(collections)),
                                thread_name_prefix="close") as pool:
            list(pool.map(Collection.close, collections))
