"""Metadata filters: the SQL compilation's limits and exact filtered top-k (what each filter
matches is tested over every store in test_stores.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_stores import ITEMS

from clipsearch import to_filter
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch_server.errors import InvalidArgument
from clipsearch_server.stores.base import NewItem
from clipsearch_server.stores.local import Collections
from clipsearch_server.stores.local.sql_filters import compile_filter
from clipsearch_server.stores.local.sqlite import Store


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "s.sqlite3")
    s.upsert([NewItem(k, np.ones(4, np.float32), v) for k, v in ITEMS.items()])
    return s


def matches(store: Store, spec) -> set[str]:
    labels = store.labels_matching(compile_filter(to_filter(spec))).tolist()
    return {r.id for r in store.get_by_labels(labels).values()}


@pytest.mark.parametrize(
    "tree",
    [
        pb.Filter(all_of=pb.FilterList()),
        pb.Filter(field=pb.FieldFilter(key="x")),
        pb.Filter(field=pb.FieldFilter(key="", exists=True)),
        pb.Filter(field=pb.FieldFilter(key="a..b", exists=True)),
        pb.Filter(field=pb.FieldFilter(key="x", range=pb.NumberRange())),
        pb.Filter(field=pb.FieldFilter(key="x", range=pb.NumberRange(gt=float("nan")))),
        pb.Filter(field=pb.FieldFilter(key="x", one_of=pb.ValueList())),
        pb.Filter(),  # a filter message with nothing set inside a list
    ],
)
def test_malformed_filters_are_invalid_argument(tree: pb.Filter) -> None:
    wrapped = pb.Filter(any_of=pb.FilterList(filters=[tree]))
    with pytest.raises(InvalidArgument):
        compile_filter(wrapped)


def test_deep_or_huge_filters_are_refused() -> None:
    leaf = pb.Filter(field=pb.FieldFilter(key="x", exists=True))
    deep = leaf
    for _ in range(40):
        deep = pb.Filter(all_of=pb.FilterList(filters=[deep]))
    with pytest.raises(InvalidArgument, match="deeper"):
        compile_filter(deep)
    with pytest.raises(InvalidArgument, match="nodes"):
        compile_filter(pb.Filter(any_of=pb.FilterList(filters=[leaf] * 1000)))


def test_values_are_bound_not_pasted(store: Store) -> None:
    assert matches(store, {"album": "x' OR 1=1 --"}) == set()
    assert matches(store, {"al'bum": 1}) == set()
    for key in ('al"bum', "al\x00bum", "a\nb"):  # JSON paths cannot express these keys
        with pytest.raises(InvalidArgument, match="double quote or a control"):
            matches(store, {key: 1})


def test_one_of_takes_its_full_value_budget(store: Store) -> None:
    many = [f"v{i}" for i in range(1000)] + ["2024", True, False, None]
    assert matches(store, {"album": {"$in": many}}) == {"a", "c"}
    assert matches(store, {"fav": {"$in": [True, False]}}) == {"a", "b"}
    with pytest.raises(InvalidArgument, match="values"):
        matches(store, {"$or": [{"album": {"$in": many[:600]}}, {"x": {"$in": many[:600]}}]})


@pytest.mark.parametrize("selectivity", [0.001, 0.05, 0.6])
def test_filtered_search_is_the_exact_top_k(tmp_path: Path, selectivity: float) -> None:
    n, dim, k = 20_000, 32, 10
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(50, dim))
    vectors = centres[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    buckets = rng.permutation(n) % 1000
    reg = Collections(tmp_path, dim, "m", m=16, ef_construction=100)
    reg.open_all()
    col = reg.create("f")
    for s in range(0, n, 5000):
        col.upsert([NewItem(f"i{i}", vectors[i], {"bucket": int(buckets[i])})
                    for i in range(s, s + 5000)])
    # A test-sized switch point: 0.1 % and 5 % are scored exactly, 60 % walks the graph.
    col.exact_search_max = 5000
    limit = int(1000 * selectivity)
    where = compile_filter(to_filter({"bucket": {"$lt": limit}}))
    allowed = np.flatnonzero(buckets < limit)
    # Queries from the data's distribution, not in the collection.
    queries = centres[rng.integers(0, 50, 20)] + 0.5 * rng.normal(size=(20, dim))
    for q in queries.astype(np.float32):
        q /= np.linalg.norm(q)
        scores = vectors[allowed] @ q
        truth = [f"i{i}" for i in allowed[np.argsort(-scores)[:k]]]
        hits = col.search(q, k, 64, where)
        assert [h.id for h in hits] == truth
        assert all(buckets[int(h.id[1:])] < limit for h in hits)
