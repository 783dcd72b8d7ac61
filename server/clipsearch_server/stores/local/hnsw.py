"""The HNSW graph of one collection: derived from the store, snapshotted, rebuildable.

hnswlib is fast but not thread-safe for writes and has no atomic persistence, so this wrapper
adds both:

* Locking: many searches run at once; an add, delete, resize or save runs alone (a
  readers-writer lock, writers first so a stream of searches cannot starve them). `set_ef` is
  index-wide state, so searches asking for different `ef` values take turns in phases: every
  search in flight shares one `ef`, and a search wanting another waits for them to finish.
* Snapshots: the graph is saved to `index-<seq>.hnsw`, fsynced, then a manifest naming that
  file, its size, SHA-256, dimension, space and the store sequence it covers is written to a
  temporary file, fsynced and renamed over `manifest.json`. A crash at any moment leaves the
  previous manifest and its file intact. hnswlib checks none of this on load (a wrong
  dimension loads silently), so `load` checks all of it.
* No stall while saving: hnswlib's save_index holds the GIL for its whole run (0.5 s at 100k
  items, measured in bench/bench_snapshot.py), which would stop every thread of the server.
  Where the OS can fork, the graph is written by a forked child instead: the fork takes a
  copy-on-write image of the graph in milliseconds, under the caller's lock, and the parent
  goes on serving while the child writes, hashes and fsyncs the file at idle priority (CPU
  and disk: it gets only what serving leaves); the parent then checks and publishes it. The
  child and its OS plumbing are in `snapshot_child.py`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import hnswlib
import numpy as np

from . import snapshot_child
from .snapshot_child import file_hash, fsync_and_hash

log = logging.getLogger(__name__)

SPACE = "ip"  # vectors are unit length: inner product is cosine similarity
MANIFEST = "manifest.json"
FORMAT = 1
MIN_CAPACITY = 1024


class SnapshotInvalid(Exception):
    """A snapshot on disk cannot be trusted; the index must be rebuilt from the store."""


@dataclass(frozen=True)
class Manifest:
    format: int
    file: str
    size: int
    sha256: str
    dim: int
    space: str
    m: int
    ef_construction: int
    capacity: int
    seq: int


@dataclass(frozen=True)
class PendingSave:
    """A snapshot being written: by a forked child (`pid`), or already written (pid None)."""

    tmp: Path
    name: str
    seq: int
    capacity: int
    pid: int | None
    least_bytes: int = 0  # a file shorter than this was cut off (hnswlib reports no errors)
    report: int | None = None  # read end of the pipe on which the child sends size and hash


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class HnswIndex:
    """One hnswlib graph plus its snapshot files in `folder`."""

    # Write snapshots from a forked child (see the module's docstring); False saves in-process.
    save_in_child: bool = hasattr(os, "fork") and sys.platform.startswith("linux")

    def __init__(self, folder: Path, dim: int, m: int, ef_construction: int) -> None:
        self.folder = folder
        self.dim = dim
        self.m = m
        self.ef_construction = ef_construction
        self.lock = ReadWriteLock()
        self.seq = 0  # store sequence number the graph reflects
        self._graph = self._empty(MIN_CAPACITY)
        # Labels the graph has held. Store labels are never reused, so one of these is either
        # live (an upsert updates it in place) or deleted for good.
        self._known: set[int] = set()
        self._ef_cond = threading.Condition()
        self._ef = self._graph.ef
        self._searches = 0

    def _empty(self, capacity: int) -> hnswlib.Index:
        graph = hnswlib.Index(space=SPACE, dim=self.dim)
        graph.init_index(max_elements=capacity, M=self.m, ef_construction=self.ef_construction,
                         allow_replace_deleted=True)
        return graph

    # --- writes: callers hold lock.write() ------------------------------------------------
    def reset(self) -> None:
        self._graph = self._empty(MIN_CAPACITY)
        self._ef = self._graph.ef
        self._known = set()
        self.seq = 0

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Insert new labels and overwrite existing ones; grows capacity as needed.

        Only new labels may take a deleted slot: hnswlib's replace_deleted does not check
        whether the label already exists, and would leave the old node live beside the new.
        """
        if len(labels) == 0:
            return
        labels = np.asarray(labels, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        old = np.fromiter((int(label) in self._known for label in labels), bool, len(labels))
        if old.any():
            self._graph.add_items(vectors[old], labels[old], replace_deleted=False)
        new = ~old
        if new.any():
            needed = self._graph.get_current_count() + int(new.sum())
            capacity = self._graph.get_max_elements()
            if needed > capacity:
                self._graph.resize_index(max(needed, capacity * 2))
            self._graph.add_items(vectors[new], labels[new], replace_deleted=True)
            self._known.update(labels[new].tolist())

    def delete(self, labels: list[int]) -> None:
        for label in labels:
            with contextlib.suppress(RuntimeError):  # not in the graph, or already deleted
                self._graph.mark_deleted(label)

    # --- reads: callers hold lock.read() --------------------------------------------------
    def search(self, vector: np.ndarray, k: int, ef: int, allowed: set[int] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(labels, similarities) best first, among `allowed` labels when given.

        Raises RuntimeError when the graph yields fewer than k (many deletions, a filter).
        """
        keep = allowed.__contains__ if allowed is not None else None
        with self._ef_phase(max(ef, k)):
            labels, distances = self._graph.knn_query(vector.reshape(1, -1), k=k, num_threads=1,
                                                      filter=keep)
        return labels[0].astype(np.int64), 1.0 - distances[0]

    def neighbours(self, vectors: np.ndarray, k: int, ef: int, threads: int,
                   allowed: set[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(labels, similarities) of each row's k nearest, best first: one batched knn_query.

        Raises RuntimeError when the graph yields fewer than k for some row.
        """
        keep = allowed.__contains__ if allowed is not None else None
        with self._ef_phase(max(ef, k)):
            labels, distances = self._graph.knn_query(vectors, k=k, num_threads=threads,
                                                      filter=keep)
        return labels.astype(np.int64), 1.0 - distances

    def adopt(self, other: HnswIndex) -> None:
        """Take over another index's graph (a compaction's result); caller holds lock.write()."""
        self._graph, self._ef, self.seq = other._graph, other._graph.ef, other.seq
        self._known = other._known

    def tombstones(self, live: int) -> int:
        """Deleted slots still in the graph (not yet reused by replace_deleted)."""
        return self._graph.get_current_count() - live

    @contextlib.contextmanager
    def _ef_phase(self, ef: int) -> Iterator[None]:
        with self._ef_cond:
            self._ef_cond.wait_for(lambda: self._ef == ef or self._searches == 0)
            if self._ef != ef:
                self._graph.set_ef(ef)
                self._ef = ef
            self._searches += 1
        try:
            yield
        finally:
            with self._ef_cond:
                self._searches -= 1
                self._ef_cond.notify_all()

    # --- persistence: callers hold lock.write() (save also works under lock.read()) --------
    def save(self) -> Manifest:
        """Write a snapshot covering `self.seq` atomically; returns its manifest."""
        return self.finish_save(self.begin_save())

    def begin_save(self, in_child: bool | None = None) -> PendingSave:
        """Start a snapshot of the graph as it is now; the caller holds the lock only for this.

        With save_in_child, a forked child writes the file while the graph goes on changing
        in the parent; otherwise the file is written here, under the caller's lock.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"index-{self.seq}.hnsw"
        # Named by this process: a child orphaned by a killed server may still be writing.
        tmp = self.folder / f"{name}.{os.getpid()}.tmp"
        capacity = self._graph.get_max_elements()
        least = 4 * self.dim * self._graph.get_current_count()
        pid = report = None
        try:
            if self.save_in_child if in_child is None else in_child:
                pid, report = snapshot_child.start(self._graph, tmp)
            else:
                self._graph.save_index(str(tmp))
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not leave partial files behind
            raise
        return PendingSave(tmp, name, self.seq, capacity, pid, least, report)

    def finish_save(self, pending: PendingSave) -> Manifest:
        """Wait for the file, then fsync, hash and publish it; needs no lock."""
        name, tmp = pending.name, pending.tmp
        try:
            if pending.pid is not None:
                assert pending.report is not None
                size, digest = snapshot_child.wait(pending.pid, pending.report, name)
            else:
                size, digest = fsync_and_hash(tmp)
            if size < pending.least_bytes:
                # hnswlib's writer does not report write errors: a short file is a full disk
                raise OSError(errno.ENOSPC, f"snapshot {name} came out short ({size} bytes)")
            os.replace(tmp, self.folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not leave partial files behind
            raise
        manifest = Manifest(
            format=FORMAT, file=name, size=size, sha256=digest, dim=self.dim, space=SPACE,
            m=self.m, ef_construction=self.ef_construction,
            capacity=pending.capacity, seq=pending.seq,
        )
        _write_atomically(self.folder / MANIFEST, json.dumps(asdict(manifest), indent=1).encode())
        for old in self.folder.glob("index-*.hnsw*"):
            if old.name != name:
                snapshot_child.remove_gradually(old)
        return manifest

    def load(self) -> Manifest:
        """Load the snapshot the manifest names, checking everything; raises SnapshotInvalid."""
        path = self.folder / MANIFEST
        try:
            manifest = Manifest(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise SnapshotInvalid("no snapshot yet") from None
        except (ValueError, TypeError) as exc:
            raise SnapshotInvalid(f"unreadable manifest: {exc}") from None
        expected = (FORMAT, self.dim, SPACE)
        if (manifest.format, manifest.dim, manifest.space) != expected:
            raise SnapshotInvalid(
                f"snapshot is format/dim/space {manifest.format}/{manifest.dim}/"
                f"{manifest.space}, expected {expected[0]}/{expected[1]}/{expected[2]}"
            )
        file = self.folder / manifest.file
        try:
            size, digest = file_hash(file)
        except FileNotFoundError:
            raise SnapshotInvalid(f"snapshot file {manifest.file} is missing") from None
        if (size, digest) != (manifest.size, manifest.sha256):
            raise SnapshotInvalid(f"snapshot file {manifest.file} is torn or altered")
        graph = hnswlib.Index(space=SPACE, dim=self.dim)
        try:
            graph.load_index(str(file), max_elements=manifest.capacity,
                             allow_replace_deleted=True)
        except RuntimeError as exc:
            raise SnapshotInvalid(f"hnswlib refused {manifest.file}: {exc}") from None
        self._graph = graph
        self._ef = graph.ef
        self._known = set(graph.get_ids_list())
        self.m, self.ef_construction, self.seq = manifest.m, manifest.ef_construction, manifest.seq
        return manifest


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
