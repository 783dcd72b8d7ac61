"""One suite over every collection store: the local one (SQLite + hnswlib) and Milvus Lite.

The same calls must give the same answers on each: filters, upsert/replace, idempotent
delete, paging in id order, search, whole-collection reads, settings that survive a reopen.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clipsearch import to_filter
from clipsearch_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from clipsearch_server.stores.base import CollectionRegistry, NewItem

UTC = dt.timezone.utc
DIM = 8
ITEMS = {
    "a": {"album": "2024", "year": 2024, "tags": ["beach", "sea"], "fav": True,
          "taken": "2024-07-01T10:00:00Z", "exif": {"camera": "X100"}},
    "b": {"album": "2023", "year": 2023, "tags": ["city"], "fav": False,
          "taken": "2023-02-01T08:00:00+01:00", "note": None},
    "c": {"album": "2024", "year": 2022.5, "tags": "sea", "taken": 1_600_000_000},
    "d": {"album": "old", "exif": {"camera": "EOS"}, "weird key": 1, "n": [1, 2]},
}
STORES = ["local", "milvus"]


def make_registry(kind: str, folder: Path, fingerprint: str = "model-a") -> CollectionRegistry:
    if kind == "milvus":
        pytest.importorskip("pymilvus")
        from clipsearch_server.stores.milvus import MilvusCollections

        registry: CollectionRegistry = MilvusCollections(str(folder / "milvus.db"), "", DIM,
                                                         fingerprint, 16, 100)
    else:
        from clipsearch_server.stores.local import Collections

        registry = Collections(folder, DIM, fingerprint, 16, 100)
    registry.open_all()
    return registry


@pytest.fixture(params=STORES)
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CollectionRegistry]:
    reg = make_registry(request.param, tmp_path)
    yield reg
    reg.close_all()


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def filled(registry: CollectionRegistry):
    col = registry.create("photos")
    col.upsert([NewItem(k, unit(i), v) for i, (k, v) in enumerate(ITEMS.items())])
    return col


def matches(col, spec) -> set[str]:
    where = col.compile_filter(to_filter(spec))
    found = {r.id for r in col.page(where, None, 100)}
    assert col.count_matching(where) == len(found)
    return found


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"album": "2024"}, {"a", "c"}),
        ({"year": 2024}, {"a"}),
        ({"year": "2024"}, set()),  # a string never equals a number
        ({"fav": True}, {"a"}),
        ({"fav": False}, {"b"}),
        ({"note": None}, {"b"}),
        ({"weird key": True}, set()),  # a bool never equals a number
        ({"tags": "sea"}, {"a", "c"}),  # list elements and scalars alike
        ({"tags": {"$in": ["city", "beach"]}}, {"a", "b"}),
        ({"year": {"$gte": 2023}}, {"a", "b"}),
        ({"year": {"$gt": 2022, "$lt": 2024}}, {"b", "c"}),
        ({"n": {"$gt": 1}}, {"d"}),  # any element of a list
        ({"n": {"$lt": 2}}, {"d"}),
        ({"n": 2}, {"d"}),
        ({"taken": {"$gte": dt.datetime(2023, 1, 1, tzinfo=UTC)}}, {"a", "b"}),
        ({"taken": {"$lt": dt.datetime(2021, 1, 1, tzinfo=UTC)}}, {"c"}),  # epoch seconds
        # 08:00 at +01:00 is 07:00 UTC
        ({"taken": {"$gt": dt.datetime(2023, 2, 1, 7, 30, tzinfo=UTC)}}, {"a"}),
        ({"exif.camera": "EOS"}, {"d"}),
        ({"exif": {"$exists": True}}, {"a", "d"}),
        ({"note": {"$exists": True}}, {"b"}),  # present, though null
        ({"fav": {"$exists": False}}, {"c", "d"}),
        ({"weird key": 1}, {"d"}),
        ({"album": "2024", "tags": "beach"}, {"a"}),
        ({"$or": [{"album": "old"}, {"year": 2023}]}, {"b", "d"}),
        ({"$not": {"album": "2024"}}, {"b", "d"}),
        ({"$nor": [{"album": "2024"}, {"album": "old"}]}, {"b"}),
        ({"missing": {"$gte": 0}}, set()),
        ({"album": 'x" or id > "" or "'}, set()),  # values are literals, never expression
    ],
)
def test_filter_semantics(registry: CollectionRegistry, spec, expected: set[str]) -> None:
    assert matches(filled(registry), spec) == expected


def test_a_range_it_cannot_answer_exactly_is_refused_not_guessed(registry) -> None:
    """{"n": [1, 2]} has no element in (1, 2), yet its smallest is < 2 and its largest > 1."""
    col = filled(registry)
    try:
        assert matches(col, {"n": {"$gt": 1, "$lt": 2}}) == set()
    except InvalidArgument as exc:
        assert "range" in str(exc) and "'n'" in str(exc)
    assert matches(col, {"year": {"$gt": 2022, "$lt": 2024}}) == {"b", "c"}  # single values


def test_upsert_replaces_delete_is_idempotent_get_and_thumbnails(registry) -> None:
    col = filled(registry)
    assert col.count() == 4
    col.upsert([NewItem("a", unit(99), {"album": "new"}, b"webp-bytes"),
                NewItem("e", unit(5), {}), NewItem("e", unit(6), {"v": 2})])  # last e wins
    assert col.count() == 5
    got = col.get(["a", "e", "zz"])
    assert set(got) == {"a", "e"}
    assert got["a"].metadata == {"album": "new"}
    np.testing.assert_allclose(got["a"].vector, unit(99), atol=1e-6)
    assert got["e"].metadata == {"v": 2}
    assert col.thumbnails(["a", "e"]) == {"a": b"webp-bytes"}
    assert matches(col, {"album": "2024"}) == {"c"}  # the replaced item left the filter
    assert col.delete(["a", "zz"]) == 1
    assert col.delete(["a"]) == 0
    assert col.count() == 4 and "a" not in col.get(["a"])


def test_paging_walks_every_item_once_in_id_order(registry) -> None:
    col = registry.create("many")
    ids = [f"item-{i:04d}" for i in range(1, 700)]
    for start in range(0, len(ids), 150):  # several write batches (segments in Milvus)
        col.upsert([NewItem(i, unit(n), {"odd": n % 2}) for n, i in
                    enumerate(ids[start:start + 150], start)][::-1])
    seen, after = [], None
    while page := col.page(col.compile_filter(None), after, 100):
        seen.extend(r.id for r in page)
        after = page[-1].id
    assert seen == sorted(ids)
    odd = col.compile_filter(to_filter({"odd": 1}))
    assert [r.id for r in col.page(odd, None, 5)] == sorted(ids[1::2])[:5]


def test_search_finds_the_nearest_and_honours_filters(registry) -> None:
    col = registry.create("s")
    vectors = [unit(i) for i in range(300)]
    col.upsert([NewItem(f"v{i}", v, {"even": i % 2 == 0}) for i, v in enumerate(vectors)])
    hits = col.search(vectors[7], 5, 64, col.compile_filter(None))
    assert hits[0].id == "v7" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    evens = col.search(vectors[7], 5, 64, col.compile_filter(to_filter({"even": True})))
    assert len(evens) == 5 and all(int(h.id[1:]) % 2 == 0 for h in evens)
    truth = sorted(range(0, 300, 2), key=lambda i: -float(vectors[i] @ vectors[7]))[:5]
    assert [h.id for h in evens] == [f"v{i}" for i in truth]
    np.testing.assert_allclose(evens[0].vector, vectors[truth[0]], atol=1e-6)
    assert col.search(vectors[0], 3, 64, col.compile_filter(to_filter({"even": "x"}))) == []


def test_whole_collection_reads_and_labelling(registry) -> None:
    col = registry.create("w")
    base = unit(1)
    twin = base + 0.02 * unit(2)
    twin /= np.linalg.norm(twin)
    col.upsert([NewItem("x", base, {}), NewItem("x-copy", twin, {})]
               + [NewItem(f"r{i}", unit(10 + i), {"r": True}) for i in range(40)])
    keys, vectors = col.read_vectors(col.compile_filter(None))
    assert len(keys) == 42 and vectors.shape == (42, DIM)
    dups = col.find_duplicates(col.compile_filter(None), 0.99, 5, 64, lambda: None)
    groups = [sorted(dups.ids[r] for r in g.members) for g in dups.groups]
    assert groups == [["x", "x-copy"]] and dups.compared == 42
    keys, _ = col.read_vectors(col.compile_filter(to_filter({"r": True})))
    assert col.set_metadata_key({k: 3 for k in np.asarray(keys).tolist()[:10]}, "cluster") == 10
    assert len(matches(col, {"cluster": 3})) == 10
    assert matches(col, {"cluster": 3}) <= matches(col, {"r": True})  # the rest kept


def test_registry_create_get_drop_and_reopen(registry, tmp_path: Path) -> None:
    col = registry.create("Alpha_1.b-c", thumbnail_size=128)
    col.upsert([NewItem("i", unit(0), {"k": "v"})])
    with pytest.raises(AlreadyExists):
        registry.create("Alpha_1.b-c")
    assert registry.create("Alpha_1.b-c", exist_ok=True).name == "Alpha_1.b-c"
    registry.create("other")
    assert registry.names() == ["Alpha_1.b-c", "other"]
    with pytest.raises(NotFound):
        registry.get("nope")
    with pytest.raises(InvalidArgument):
        registry.get("bad name!")
    assert registry.drop("other") is True
    assert registry.drop("other") is False
    kind = "milvus" if type(registry).__name__.startswith("Milvus") else "local"
    registry.close_all()
    again = make_registry(kind, tmp_path)
    try:
        assert again.names() == ["Alpha_1.b-c"]
        info = again.get("Alpha_1.b-c").info()
        assert (info.count, info.dim, info.thumbnail_size, info.model_fingerprint) == (
            1, DIM, 128, "model-a")
        assert again.get("Alpha_1.b-c").get(["i"])["i"].metadata == {"k": "v"}
    finally:
        again.close_all()


def test_vectors_of_another_shape_or_model_are_refused(registry) -> None:
    col = registry.create("m")
    with pytest.raises(InvalidArgument, match="dimension"):
        col.upsert([NewItem("i", np.ones(DIM + 1, np.float32), {})])
    with pytest.raises(FailedPrecondition, match="model-a"):
        col.check_model("model-b")
    assert col.count() == 0


@pytest.mark.parametrize("kind", STORES)
def test_a_new_data_dir_is_created_for_every_store(kind: str, tmp_path: Path) -> None:
    """`serve --data-dir new/dir --store milvus` must work as the local store does (issue 18)."""
    folder = tmp_path / "new" / "dir"
    reg = make_registry(kind, folder)
    try:
        reg.create("c").upsert([NewItem("i", unit(0), {})])
        assert reg.names() == ["c"]
    finally:
        reg.close_all()
    assert folder.is_dir()


def test_milvus_load_is_tried_again_after_an_engine_error(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """An engine restarted after a crash may fail its first read of an index file; loading a
    collection is tried again (LOAD_TRIES), and a lasting failure still surfaces."""
    pytest.importorskip("pymilvus")
    from pymilvus.exceptions import MilvusException

    from clipsearch_server.stores.milvus import registry

    class FlakyClient:
        def __init__(self, failures: int) -> None:
            self.failures, self.calls = failures, 0

        def load_collection(self, name: str) -> None:
            self.calls += 1
            if self.calls <= self.failures:
                raise MilvusException(message="read error: Resource temporarily unavailable")

    monkeypatch.setattr(registry, "LOAD_RETRY_S", 0.0)
    collections = registry.MilvusCollections.__new__(registry.MilvusCollections)
    collections.client = FlakyClient(failures=registry.LOAD_TRIES - 1)
    collections._load_into_memory("cs_x")
    assert collections.client.calls == registry.LOAD_TRIES
    collections.client = FlakyClient(failures=registry.LOAD_TRIES)
    with pytest.raises(MilvusException, match="temporarily unavailable"):
        collections._load_into_memory("cs_x")
    assert collections.client.calls == registry.LOAD_TRIES
