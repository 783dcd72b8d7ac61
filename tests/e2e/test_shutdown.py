"""Shutdown with many collections: fast enough for an orchestrator's grace period, losing nothing.

SIGTERM snapshots the changed graphs (in-process, a few threads, within a time budget) and
closes the stores. A graph left unsaved is rebuilt at the next start from its older snapshot
plus the store, which holds every acknowledged write.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np

from clipsearch import Client
from clipsearch_server.stores.base import NewItem
from clipsearch_server.stores.local import Collection, Collections, snapshot_child
from clipsearch_server.stores.local.hnsw import MANIFEST
from conftest import ServerProcess

DIM = 64  # the tiny model's
COLLECTIONS = 400
ITEMS = 3  # per collection
TOUCHED = 50  # collections written again before the second shutdown
EXIT_WITHIN_S = 10.0


def unit_rows(n: int, rng: np.random.Generator, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def sigterm_and_time(proc: ServerProcess) -> tuple[int, float]:
    assert proc.proc is not None
    started = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    code = proc.wait(120)
    return code, time.monotonic() - started


def check_everything(proc: ServerProcess, expected: dict[str, dict[str, np.ndarray]]) -> None:
    with Client(proc.address) as c:
        assert {info.name for info in c.collections()} == set(expected)
        for name, items in expected.items():
            got = {r.id: r.vector for r in c.get(name, list(items), include_vectors=True)}
            assert set(got) == set(items), name
            for id_, vector in items.items():
                assert np.allclose(got[id_], vector, atol=1e-6), (name, id_)
        # the graphs came back too, not only the stores
        for name in list(expected)[::40]:
            id_, vector = next(iter(expected[name].items()))
            assert c.search(name, vector=vector, k=1)[0].id == id_, name


def test_sigterm_with_400_collections_exits_fast_and_loses_nothing(tiny_checkpoint, tmp_path
                                                                    ) -> None:
    data = tmp_path / "data"
    rng = np.random.default_rng(18)
    expected: dict[str, dict[str, np.ndarray]] = {}

    # 1. every collection changed since its last snapshot (none has one yet)
    first = ServerProcess(tiny_checkpoint, data).start()
    with Client(first.address) as c:
        for i in range(COLLECTIONS):
            name, vectors = f"c{i:03d}", unit_rows(ITEMS, rng)
            ids = [f"{name}-{j}" for j in range(ITEMS)]
            c.upsert(name, ids=ids, vectors=vectors)
            expected[name] = dict(zip(ids, vectors, strict=True))
    code, took = sigterm_and_time(first)
    assert code == 0, first.log()
    assert took < EXIT_WITHIN_S, f"exit took {took:.1f}s\n{first.log()}"
    assert f"saved {COLLECTIONS} of {COLLECTIONS} changed indexes" in first.log()

    # 2. some collections changed, and no time for snapshots: those are replayed at the start
    second = ServerProcess(tiny_checkpoint, data,
                           env={"CLIPSEARCH_SHUTDOWN_SNAPSHOT_S": "0"}).start()
    assert second.log().count("loaded snapshot in") >= COLLECTIONS
    check_everything(second, expected)
    with Client(second.address) as c:
        for i in range(0, COLLECTIONS, COLLECTIONS // TOUCHED):
            name, vector = f"c{i:03d}", unit_rows(1, rng)
            c.upsert(name, ids=[f"{name}-late"], vectors=vector)
            expected[name][f"{name}-late"] = vector[0]
    code, took = sigterm_and_time(second)
    assert code == 0, second.log()
    assert took < EXIT_WITHIN_S, f"exit took {took:.1f}s\n{second.log()}"
    assert f"saved 0 of {TOUCHED} changed indexes" in second.log()

    third = ServerProcess(tiny_checkpoint, data).start()
    try:
        log = third.log()
        assert log.count("loaded snapshot + replay in") == TOUCHED
        check_everything(third, expected)
    finally:
        code, took = sigterm_and_time(third)
    assert code == 0, third.log()
    assert took < EXIT_WITHIN_S, f"exit took {took:.1f}s\n{third.log()}"


def registry(root: Path) -> Collections:
    reg = Collections(root, 32, "test-model", m=16, ef_construction=100)
    reg.open_all()
    return reg


def test_shutdown_saves_in_process_most_unsaved_first_and_skips_what_is_out_of_time(
        tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(7)
    reg = registry(tmp_path)
    vectors: dict[str, np.ndarray] = {}
    for name, n in (("small", 5), ("large", 50), ("medium", 20)):
        vectors[name] = unit_rows(n, rng, 32)
        reg.create(name).upsert(
            [NewItem(f"{name}{i}", v, {}) for i, v in enumerate(vectors[name])])

    def no_fork(*_: object) -> None:
        raise AssertionError("a shutdown snapshot forked")

    monkeypatch.setattr(snapshot_child, "start", no_fork)
    order: list[str] = []
    real = Collection.snapshot

    def recording(self: Collection, *args: object, **kwargs: object) -> bool:
        order.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Collection, "snapshot", recording)
    monkeypatch.setattr("clipsearch_server.stores.local.registry.SHUTDOWN_THREADS", 1)
    reg.snapshot_all(budget_s=60)
    assert order == ["large", "medium", "small"]
    assert all((tmp_path / "collections" / name / MANIFEST).exists() for name in vectors)

    # written after the snapshots, then no time left to save them: replayed at the next open
    reg.get("small").upsert([NewItem("late", unit_rows(1, rng, 32)[0], {})])
    manifest = (tmp_path / "collections" / "small" / MANIFEST).read_text()
    order.clear()
    reg.snapshot_all(budget_s=0)
    assert (tmp_path / "collections" / "small" / MANIFEST).read_text() == manifest
    reg.close_all()

    again = registry(tmp_path)
    try:
        small = again.get("small")
        assert small.count() == 6 and small.unsaved() == 1
        assert set(small.get(["late", "small0"])) == {"late", "small0"}
        for name, rows in vectors.items():
            hits = again.get(name).search(rows[0], k=1, ef=50)
            assert hits[0].id == f"{name}0"
    finally:
        again.close_all()
