"""Every collection of the local store: the folders under `<data_dir>/collections`, opened at
start, created and dropped by name, and saved together by the snapshot timer and at shutdown.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ...errors import AlreadyExists, NotFound, Unavailable
from ...thumbnails import DEFAULT_THUMBNAIL_SIZE
from ..base import NAME_PATTERN, check_name
from .collection import STORE_FILE, Collection, writing
from .hnsw import fsync_dir
from .sqlite import Store

log = logging.getLogger(__name__)

# Threads that save graphs and close stores at shutdown: hnswlib's save holds the GIL, but the
# fsyncs around it (graph file, manifest, folder, the store's last checkpoint) overlap.
SHUTDOWN_THREADS = 8


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
                with writing(f"create collection {name}"):
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
                with writing(f"drop collection {name}"):
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
