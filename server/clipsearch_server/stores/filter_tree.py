"""The API's filter tree as every store reads it: the walk, the key rules, the limits and the
checks of each field test. An engine supplies only how a field test is written in its terms
(`local/sql_filters.py`: SQL over JSON text; `milvus/filters.py`: Milvus expressions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from google.protobuf import struct_pb2, timestamp_pb2

from clipsearch.v1 import clipsearch_pb2 as pb

from ..errors import InvalidArgument

MAX_DEPTH = 16
MAX_NODES = 256
MAX_KEY_CHARS = 256
# Values across the whole tree: bounds what a filter becomes and the time to prepare it.
MAX_VALUES = 1024
# (bound, comparison) of a range, lower bounds first
BOUNDS = (("gt", ">"), ("gte", ">="), ("lt", "<"), ("lte", "<="))


def walk_filter(tree: pb.Filter, field: Callable[[pb.FieldFilter], str],
                words: tuple[str, str, str]) -> str:
    """The tree as one boolean expression: `field` writes each field test, `words` are the
    target language's and/or/not. Checks the limits every store shares (depth, nodes, values)."""
    budget = [MAX_NODES, MAX_VALUES]  # nodes left, values left
    and_, or_, not_ = words

    def node(f: pb.Filter, depth: int) -> str:
        budget[0] -= 1
        if budget[0] < 0:
            raise InvalidArgument(f"filter has more than {MAX_NODES} nodes")
        if depth > MAX_DEPTH:
            raise InvalidArgument(f"filter is nested deeper than {MAX_DEPTH} levels")
        kind = f.WhichOneof("kind")
        if kind == "field":
            budget[1] -= len(f.field.one_of.values) if f.field.HasField("one_of") else 1
            if budget[1] < 0:
                raise InvalidArgument(f"filter has more than {MAX_VALUES} values in all")
            return field(f.field)
        if kind in ("all_of", "any_of", "none_of"):
            children = getattr(f, kind).filters
            if not children:
                raise InvalidArgument(f"filter {kind} needs at least one filter")
            parts = [node(child, depth + 1) for child in children]
            if kind == "all_of":
                return "(" + f" {and_} ".join(parts) + ")"
            joined = "(" + f" {or_} ".join(parts) + ")"
            return joined if kind == "any_of" else f"({not_} {joined})"
        raise InvalidArgument("filter node has no kind: set field, all_of, any_of or none_of")

    return node(tree, 0)


def key_parts(key: str) -> list[str]:
    """The dotted parts of a field test's key, checked against the rules every store shares."""
    if not key or len(key) > MAX_KEY_CHARS:
        raise InvalidArgument(f"filter key must be 1 to {MAX_KEY_CHARS} characters")
    if '"' in key or not key.isprintable():
        # SQLite's JSON paths have no escape for a double quote inside a quoted label
        raise InvalidArgument(f"filter key {key!r} has a double quote or a control character")
    parts = key.split(".")
    if any(not p for p in parts):
        raise InvalidArgument(f"filter key {key!r} has an empty part")
    return parts


def one_of_values(f: pb.FieldFilter) -> Sequence[struct_pb2.Value]:
    """The values of a one_of test: 1 to MAX_VALUES of them."""
    values = f.one_of.values
    if not values or len(values) > MAX_VALUES:
        raise InvalidArgument(f"one_of of {f.key!r} needs 1 to {MAX_VALUES} values")
    return values


def bounds(f: pb.FieldFilter) -> list[tuple[str, str, float]]:
    """(bound, comparison, number) of each bound of a range or time_range test, lower bounds
    first; a time is its seconds since the epoch. At least one bound."""
    condition = f.WhichOneof("condition")
    rng = getattr(f, condition)
    found = []
    for bound, op in BOUNDS:
        if rng.HasField(bound):
            value = getattr(rng, bound)
            found.append((bound, op, finite(value, f.key) if condition == "range"
                          else seconds(value)))
    if not found:
        raise InvalidArgument(f"range on {f.key!r} has no bound")
    return found


def finite(x: float, key: str) -> float:
    if not math.isfinite(x):
        raise InvalidArgument(f"filter on {key!r} has a NaN or infinite number")
    return x


def seconds(t: timestamp_pb2.Timestamp) -> float:
    return t.seconds + t.nanos / 1e9


def not_a_scalar() -> InvalidArgument:
    """The error for an equals or one_of value that is a list or an object."""
    return InvalidArgument("equals and one_of take strings, numbers, bools or null")


def no_condition(key: str) -> InvalidArgument:
    return InvalidArgument(f"filter on {key!r} has no condition")
