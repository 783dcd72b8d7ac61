"""Collections without a server: store + index in step, growth, snapshots, recovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipsearch_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from clipsearch_server.stores.base import NewItem
from clipsearch_server.stores.local import Collections
from clipsearch_server.stores.local.sqlite import Store

DIM = 32


def unit_rows(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def items(vectors: np.ndarray, prefix: str = "i", start: int = 0) -> list[NewItem]:
    return [NewItem(f"{prefix}{start + i}", v, {"n": start + i}) for i, v in enumerate(vectors)]


def registry(root: Path) -> Collections:
    c = Collections(root, DIM, "test-model", m=16, ef_construction=100)
    c.open_all()
    return c


def test_capacity_grows_past_the_initial_graph(tmp_path: Path) -> None:
    col = registry(tmp_path).create("grow")
    vectors = unit_rows(3000, 0)
    for start in range(0, 3000, 700):
        col.upsert(items(vectors[start:start + 700], start=start))
    assert col.count() == 3000
    for i in (0, 1234, 2999):
        assert col.search(vectors[i], 1, 64)[0].id == f"i{i}"


def test_repeated_id_in_one_batch_keeps_the_last(tmp_path: Path) -> None:
    col = registry(tmp_path).create("dupes")
    v = unit_rows(2, 1)
    col.upsert([NewItem("same", v[0], {"v": 0}), NewItem("same", v[1], {"v": 1})])
    assert col.count() == 1
    [hit] = col.search(v[1], 5, 64)
    assert (hit.id, hit.metadata) == ("same", {"v": 1})
    assert hit.score == pytest.approx(1.0, abs=1e-5)


def test_search_after_heavy_deletion_still_answers(tmp_path: Path) -> None:
    col = registry(tmp_path).create("sparse")
    vectors = unit_rows(500, 2)
    col.upsert(items(vectors))
    col.delete([f"i{i}" for i in range(495)])
    hits = col.search(vectors[0], 10, 10)
    assert sorted(h.id for h in hits) == [f"i{i}" for i in range(495, 500)]


def test_snapshot_then_replay_of_later_writes(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    col = reg.create("replay")
    vectors = unit_rows(200, 3)
    col.upsert(items(vectors[:100]))
    assert col.snapshot()
    assert not col.snapshot()  # unchanged: nothing to save
    col.upsert(items(vectors[100:], start=100))
    col.delete(["i5"])
    reg.close_all()  # no second snapshot: the store is ahead of it

    col = registry(tmp_path).get("replay")
    assert col.count() == 199
    assert col.search(vectors[150], 1, 64)[0].id == "i150"
    assert all(h.id != "i5" for h in col.search(vectors[5], 10, 64))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "manifest"])
def test_damaged_snapshot_is_rebuilt_from_the_store(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    reg = registry(tmp_path)
    col = reg.create("damaged")
    vectors = unit_rows(300, 4)
    col.upsert(items(vectors))
    col.snapshot()
    reg.close_all()
    folder = tmp_path / "collections" / "damaged"
    [graph] = folder.glob("index-*.hnsw")
    if damage == "truncate":
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    elif damage == "garbage":
        graph.write_bytes(np.random.default_rng(0).bytes(graph.stat().st_size))
    elif damage == "delete":
        graph.unlink()
    else:
        (folder / "manifest.json").write_text("{not json")

    col = registry(tmp_path).get("damaged")
    assert "rebuilding the index from the store" in caplog.text
    assert col.count() == 300
    for i in (0, 150, 299):
        assert col.search(vectors[i], 1, 64)[0].id == f"i{i}"


def test_model_fingerprint_and_dimension_are_enforced(tmp_path: Path) -> None:
    col = registry(tmp_path).create("fp")
    col.check_model("test-model")
    with pytest.raises(FailedPrecondition):
        col.check_model("another-model")
    with pytest.raises(InvalidArgument):
        col.upsert([NewItem("x", np.ones(DIM + 1, np.float32), {})])
    assert col.count() == 0


def test_registry_create_get_drop_and_names(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    reg.create("a")
    with pytest.raises(AlreadyExists):
        reg.create("a")
    assert reg.create("a", exist_ok=True) is reg.get("a")
    with pytest.raises(InvalidArgument):
        reg.create("../escape")
    with pytest.raises(NotFound):
        reg.get("b")
    dropped = reg.get("a")
    assert reg.drop("a") and not reg.drop("a")
    with pytest.raises(NotFound):
        dropped.upsert(items(unit_rows(1, 5)))
    assert reg.names() == []
    assert not (tmp_path / "collections" / "a").exists()
    reg.close_all()
    assert registry(tmp_path).names() == []


def test_churn_triggers_a_rebuild_that_drops_tombstones(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    col = reg.create("churn")
    vectors = unit_rows(3000, 6)
    col.upsert(items(vectors))
    assert not col.compact_if_churned()  # no churn yet
    col.delete([f"i{i}" for i in range(0, 3000, 3)] + [f"i{i}" for i in range(1, 1500, 3)])
    assert col.index.tombstones(col.count()) == 1500
    assert col.compact_if_churned()
    assert col.index.tombstones(col.count()) == 0
    assert not col.compact_if_churned()
    live = [i for i in range(3000) if i % 3 == 2 or (i % 3 == 1 and i >= 1500)]
    assert col.count() == len(live) == 1500
    for i in live[::100]:
        assert col.search(vectors[i], 1, 64)[0].id == f"i{i}"
    col.upsert(items(vectors[:1]))  # writes keep working on the new graph
    assert col.search(vectors[0], 1, 64)[0].id == "i0"
    reg.snapshot_all()
    reg.close_all()
    reopened = registry(tmp_path).get("churn")
    assert reopened.count() == 1501
    assert reopened.search(vectors[live[7]], 1, 64)[0].id == f"i{live[7]}"


def test_reupsert_after_a_delete_leaves_no_stale_copy(tmp_path: Path) -> None:
    """hnswlib's replace_deleted would hand a freed slot to a label still in the graph."""
    col = registry(tmp_path).create("stale")
    v = unit_rows(4, 8)
    col.upsert([NewItem(n, v[i], {}) for i, n in enumerate("abc")])
    col.delete(["b"])
    col.upsert([NewItem("a", v[3], {})])
    hits = col.search(v[0], 3, 64)
    assert sorted(h.id for h in hits) == ["a", "c"]
    assert col.search(v[3], 1, 64)[0].score == pytest.approx(1.0, abs=1e-5)
    col.delete(["a"])
    assert [h.id for h in col.search(v[0], 1, 64)] == ["c"]


def test_a_create_cut_off_before_its_settings_is_cleaned_up(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    reg.create("whole")
    reg.close_all()
    half = tmp_path / "collections" / "half"
    half.mkdir()
    Store(half / "store.sqlite3").close()  # schema, but the settings never committed
    reopened = registry(tmp_path)
    assert reopened.names() == ["whole"]
    assert not half.exists()
