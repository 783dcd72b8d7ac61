"""Snapshots written by a forked child: the graph as it was at the fork, published atomically.

hnswlib's save_index holds the GIL for its whole run (bench/bench_snapshot.py measures it), so
the index forks a child to write the file while the parent keeps serving.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from clipsearch_server.stores.local import Collection, Collections, snapshot_child
from clipsearch_server.stores.local.hnsw import MANIFEST, HnswIndex

pytestmark = pytest.mark.skipif(not HnswIndex.save_in_child,
                                reason="snapshots are written in-process on this platform")
DIM = 32


def unit_rows(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def collection(root: Path) -> Collection:
    registry = Collections(root, DIM, "test-model", m=16, ef_construction=100)
    registry.open_all()
    return registry.create("forked")


def add(col: Collection, vectors: np.ndarray, start: int) -> None:
    from clipsearch_server.stores.base import NewItem

    col.upsert([NewItem(f"i{start + i}", v, {}) for i, v in enumerate(vectors)])


def test_the_snapshot_is_the_graph_at_the_fork_and_writes_go_on_meanwhile(tmp_path) -> None:
    col = collection(tmp_path)
    add(col, unit_rows(500, 0), 0)
    with col.index.lock.write():
        pending = col.index.begin_save()
        assert pending.pid is not None  # a child writes the file
    seq_at_fork = pending.seq
    add(col, unit_rows(300, 1), 500)  # the parent's graph changes while the child writes
    manifest = col.index.finish_save(pending)
    assert manifest.seq == seq_at_fork < col.index.seq

    saved = HnswIndex(col.folder, DIM, 16, 100)
    assert saved.load().seq == seq_at_fork
    assert saved._graph.get_current_count() == 500
    assert json.loads((col.folder / MANIFEST).read_text())["file"] == manifest.file
    assert not list(col.folder.glob("*.tmp"))


def test_forked_and_in_process_saves_write_the_same_file(tmp_path, monkeypatch) -> None:
    col = collection(tmp_path)
    add(col, unit_rows(400, 2), 0)
    forked = col.index.save()
    monkeypatch.setattr(HnswIndex, "save_in_child", False)
    in_process = col.index.save()
    assert (forked.size, forked.sha256) == (in_process.size, in_process.sha256)


def test_a_failed_save_raises_and_leaves_the_last_good_snapshot(tmp_path, monkeypatch) -> None:
    col = collection(tmp_path)
    add(col, unit_rows(200, 3), 0)
    assert col.snapshot()
    good = json.loads((col.folder / MANIFEST).read_text())
    add(col, unit_rows(10, 4), 200)
    # hnswlib writes nothing, silently, where it cannot open the file: the check catches it.
    blocker = col.folder / f"index-{col.index.seq}.hnsw.{os.getpid()}.tmp"
    blocker.mkdir()
    with pytest.raises(OSError):
        col.snapshot()
    assert json.loads((col.folder / MANIFEST).read_text()) == good
    blocker.rmdir()

    def dying_child(graph: object, path: Path) -> tuple[int, int]:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os._exit(3)
        os.close(write_end)
        return pid, read_end

    monkeypatch.setattr(snapshot_child, "start", dying_child)
    with col.index.lock.write():
        pending = col.index.begin_save()
    with pytest.raises(snapshot_child.ChildSaveFailed, match="exit status 3"):
        col.index.finish_save(pending)
    assert json.loads((col.folder / MANIFEST).read_text()) == good
    # A snapshot whose child dies is saved in-process instead.
    assert col.snapshot()
    assert json.loads((col.folder / MANIFEST).read_text())["seq"] == col.index.seq
    assert not list(col.folder.glob("*.tmp"))


def test_a_collection_reopens_from_a_forked_snapshot_plus_replay(tmp_path) -> None:
    col = collection(tmp_path)
    vectors = unit_rows(600, 5)
    add(col, vectors[:400], 0)
    assert col.snapshot()
    add(col, vectors[400:], 400)
    col.close()
    again = Collection.open(col.folder)
    assert again.count() == 600
    for i in (0, 399, 599):
        assert again.search(vectors[i], 1, 64)[0].id == f"i{i}"
    again.close()
