"""Metadata filters: the API's filter tree compiled to one SQL condition over the store.

Metadata is stored as JSON text, so a filter becomes a WHERE clause using SQLite's JSON
functions. Each field test runs over `json_each` of the field, which yields the value itself
for a scalar and each element for a list: `{"tags": ["a", "b"]}` equals "a". Values are bound
as parameters, never pasted into SQL; keys become quoted JSON paths.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf import struct_pb2, timestamp_pb2

from clipsearch.v1 import clipsearch_pb2 as pb

from .errors import InvalidArgument

MAX_DEPTH = 16
MAX_NODES = 256
MAX_KEY_CHARS = 256
# Values across the whole tree: bounds the SQL a filter becomes and the time to prepare it.
MAX_VALUES = 1024
_NUMBER = "type IN ('integer', 'real')"
# Seconds since the epoch of a JSON number, or of an ISO 8601 text (NULL when unparsable).
_SECONDS = (
    "(CASE WHEN type IN ('integer', 'real') THEN value "
    "WHEN type = 'text' THEN (julianday(value) - 2440587.5) * 86400.0 END)"
)


@dataclass(frozen=True)
class SqlFilter:
    """A WHERE condition on the `items` table and its bound parameters."""

    where: str
    params: tuple


MATCH_ALL = SqlFilter("1", ())


def compile_filter(tree: pb.Filter | None) -> SqlFilter:
    """Check a filter tree and compile it; an absent or empty filter matches everything."""
    if tree is None or tree.WhichOneof("kind") is None:
        return MATCH_ALL
    params: list = []
    return SqlFilter(walk_filter(tree, lambda f: _field(f, params), ("AND", "OR", "NOT")),
                     tuple(params))


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


def _field(f: pb.FieldFilter, params: list) -> str:
    path = _json_path(f.key)
    condition = f.WhichOneof("condition")
    if condition == "exists":
        params.append(path)
        return f"(json_type(metadata, ?) IS {'NOT ' if f.exists else ''}NULL)"
    params.append(path)  # json_each's argument comes before the test's parameters
    if condition == "equals":
        test = _equals(f.equals, params)
    elif condition == "one_of":
        values = f.one_of.values
        if not values or len(values) > MAX_VALUES:
            raise InvalidArgument(f"one_of of {f.key!r} needs 1 to {MAX_VALUES} values")
        test = _one_of(values, params)
    elif condition == "range":
        test = _bounds(f.range, _NUMBER + " AND value", params, _number, f.key)
    elif condition == "time_range":
        test = _bounds(f.time_range, _SECONDS, params, _seconds, f.key)
    else:
        raise InvalidArgument(f"filter on {f.key!r} has no condition")
    return f"EXISTS (SELECT 1 FROM json_each(metadata, ?) WHERE {test})"


def _json_path(key: str) -> str:
    if not key or len(key) > MAX_KEY_CHARS:
        raise InvalidArgument(f"filter key must be 1 to {MAX_KEY_CHARS} characters")
    if '"' in key or not key.isprintable():
        # SQLite's JSON paths have no escape for a double quote inside a quoted label
        raise InvalidArgument(f"filter key {key!r} has a double quote or a control character")
    parts = key.split(".")
    if any(not p for p in parts):
        raise InvalidArgument(f"filter key {key!r} has an empty part")
    return "$" + "".join(f'."{p}"' for p in parts)


def _equals(value: struct_pb2.Value, params: list) -> str:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        params.append(value.string_value)
        return "(type = 'text' AND value = ?)"
    if kind == "number_value":
        params.append(_number(value.number_value, "equals"))
        return f"({_NUMBER} AND value = ?)"
    if kind == "bool_value":
        return "(type = 'true')" if value.bool_value else "(type = 'false')"
    if kind == "null_value":
        return "(type = 'null')"
    raise InvalidArgument("equals and one_of take strings, numbers, bools or null")


def _one_of(values, params: list) -> str:
    """Membership as SQL IN lists, one per JSON type: a flat expression however many values."""
    strings = [v.string_value for v in values if v.WhichOneof("kind") == "string_value"]
    numbers = [_number(v.number_value, "one_of") for v in values
               if v.WhichOneof("kind") == "number_value"]
    tests = []
    if strings:
        params.extend(strings)
        tests.append(f"(type = 'text' AND value IN ({', '.join('?' * len(strings))}))")
    if numbers:
        params.extend(numbers)
        tests.append(f"({_NUMBER} AND value IN ({', '.join('?' * len(numbers))}))")
    others = {(v.WhichOneof("kind"), v.bool_value): v for v in values
              if v.WhichOneof("kind") not in ("string_value", "number_value")}
    tests.extend(_equals(v, params) for v in others.values())
    return "(" + " OR ".join(tests) + ")"


def _bounds(rng, expr: str, params: list, convert, key: str) -> str:
    tests = []
    for bound, op in (("gt", ">"), ("gte", ">="), ("lt", "<"), ("lte", "<=")):
        if rng.HasField(bound):
            params.append(convert(getattr(rng, bound), key))
            tests.append(f"{expr} {op} ?")
    if not tests:
        raise InvalidArgument(f"range on {key!r} has no bound")
    return "(" + " AND ".join(tests) + ")"


def _number(x: float, key: str) -> float:
    if not math.isfinite(x):
        raise InvalidArgument(f"filter on {key!r} has a NaN or infinite number")
    return x


def _seconds(t: timestamp_pb2.Timestamp, key: str) -> float:
    return t.seconds + t.nanos / 1e9
