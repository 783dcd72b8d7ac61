"""The API's metadata filters as Milvus boolean expressions, exactly or not at all.

Milvus compares JSON values loosely: `meta["n"] == true` matches the number 1, there is no
"any element of this list" range test, a key holding null reads as absent, and ISO 8601 text
is not a time. So every item also carries a shadow JSON field, `x`, written from its metadata
(`shadow_of`), in which each dotted path's values are split by type:

    x["p"]  paths present                     x["z"]  paths holding null (or a list with null)
    x["s"][path] strings   x["n"][path] numbers   x["b"][path] booleans   (always lists)
    x["lo"][path], x["hi"][path]   smallest and largest number
    x["tlo"][path], x["thi"][path] earliest and latest time (epoch numbers and ISO 8601 text)

Equality and membership become `json_contains` tests on the typed lists, one-bound ranges
compare the smallest or largest value, and a range with two bounds is exact where a path holds
at most one value. Where some item holds several numbers (or times) under a path, a two-bound
range on that path is refused with INVALID_ARGUMENT rather than answered wrongly; the store
keeps those paths in the collection's properties (`multi_paths`). The walk, the key rules and
the limits are every store's (`stores/filter_tree.py`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass

from clipsearch.v1 import clipsearch_pb2 as pb

from ...errors import InvalidArgument
from .. import filter_tree


@dataclass(frozen=True)
class MilvusFilter:
    """A Milvus boolean expression ("" matches everything)."""

    expr: str


MATCH_ALL = MilvusFilter("")


def shadow_of(metadata: dict) -> dict:
    """The typed shadow of an item's metadata that filters test (see the module docstring)."""
    x: dict = {"p": [], "z": [], "s": {}, "n": {}, "b": {}, "lo": {}, "hi": {}, "tlo": {},
               "thi": {}}
    for path, value in _paths(metadata, ""):
        x["p"].append(path)
        values = value if isinstance(value, list) else [value]
        if any(v is None for v in values):
            x["z"].append(path)
        strings = [v for v in values if isinstance(v, str)]
        bools = [v for v in values if isinstance(v, bool)]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        times = numbers + [t for t in map(_epoch, strings) if t is not None]
        for key, got in (("s", strings), ("b", bools), ("n", numbers)):
            if got:
                x[key][path] = got
        if numbers:
            x["lo"][path], x["hi"][path] = min(numbers), max(numbers)
        if times:
            x["tlo"][path], x["thi"][path] = min(times), max(times)
    return x


def multi_paths(x: dict) -> set[str]:
    """Paths of one shadow holding several numbers or times (two-bound ranges cannot be exact)."""
    return ({p for p in x["lo"] if x["lo"][p] != x["hi"][p]}
            | {p for p in x["tlo"] if x["tlo"][p] != x["thi"][p]})


def _paths(value: dict, prefix: str) -> Iterator[tuple[str, object]]:
    for key, inner in value.items():
        path = f"{prefix}{key}"
        yield path, inner
        if isinstance(inner, dict):
            yield from _paths(inner, path + ".")


def _epoch(text: str) -> float | None:
    """Seconds since the epoch of an ISO 8601 text, as SQLite's julianday reads it; else None."""
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def compile_milvus_filter(tree: pb.Filter | None, multi: set[str]) -> MilvusFilter:
    """Check a filter tree and translate it; `multi` are the collection's multi-value paths."""
    if tree is None or tree.WhichOneof("kind") is None:
        return MATCH_ALL
    return MilvusFilter(
        filter_tree.walk_filter(tree, lambda f: _field(f, multi), ("and", "or", "not")))


def _field(f: pb.FieldFilter, multi: set[str]) -> str:
    filter_tree.key_parts(f.key)  # the same key rules as the local store
    path = _literal(f.key)
    condition = f.WhichOneof("condition")
    if condition == "exists":
        test = f"json_contains(x[\"p\"], {path})"
        return test if f.exists else f"(not {test})"
    if condition == "equals":
        return _one_of([f.equals], path)
    if condition == "one_of":
        return _one_of(list(filter_tree.one_of_values(f)), path)
    if condition in ("range", "time_range"):
        rng = getattr(f, condition)
        if ((rng.HasField("gt") or rng.HasField("gte"))
                and (rng.HasField("lt") or rng.HasField("lte")) and f.key in multi):
            raise InvalidArgument(
                f"{condition} with both bounds on {f.key!r} cannot be answered exactly by the "
                f"milvus store: some items hold several values under {f.key!r}. Use one bound, "
                "or split the values into separate keys", "filter")
        lo, hi = ('"lo"', '"hi"') if condition == "range" else ('"tlo"', '"thi"')
        # any value above a lower bound: the largest is; below an upper: the smallest is
        tests = [f"x[{hi if bound.startswith('g') else lo}][{path}] {op} {number!r}"
                 for bound, op, number in filter_tree.bounds(f)]
        return "(" + " and ".join(tests) + ")"
    raise filter_tree.no_condition(f.key)


def _one_of(values: list, path: str) -> str:
    typed: dict[str, list] = {"s": [], "n": [], "b": []}
    tests = []
    for v in values:
        kind = v.WhichOneof("kind")
        if kind == "string_value":
            typed["s"].append(v.string_value)
        elif kind == "number_value":
            typed["n"].append(filter_tree.finite(v.number_value, "one_of"))
        elif kind == "bool_value":
            typed["b"].append(v.bool_value)
        elif kind == "null_value":
            tests.append(f"json_contains(x[\"z\"], {path})")
        else:
            raise filter_tree.not_a_scalar()
    for key, got in typed.items():
        if got:
            unique = list(dict.fromkeys(got))
            tests.append(f"json_contains_any(x[\"{key}\"][{path}], {json.dumps(unique)})")
    return "(" + " or ".join(dict.fromkeys(tests)) + ")"


def _literal(text: str) -> str:
    """A Milvus string literal (JSON's escaping is what its parser reads)."""
    return json.dumps(text)

