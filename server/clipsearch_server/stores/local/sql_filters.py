"""Metadata filters: the API's filter tree compiled to one SQL condition over the store.

Metadata is stored as JSON text, so a filter becomes a WHERE clause using SQLite's JSON
functions. Each field test runs over `json_each` of the field, which yields the value itself
for a scalar and each element for a list: `{"tags": ["a", "b"]}` equals "a". Values are bound
as parameters, never pasted into SQL; keys become quoted JSON paths. The walk, the key rules
and the limits are every store's (`stores/filter_tree.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import struct_pb2

from clipsearch.v1 import clipsearch_pb2 as pb

from .. import filter_tree

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
    where = filter_tree.walk_filter(tree, lambda f: _field(f, params), ("AND", "OR", "NOT"))
    return SqlFilter(where, tuple(params))


def _field(f: pb.FieldFilter, params: list) -> str:
    path = "$" + "".join(f'."{p}"' for p in filter_tree.key_parts(f.key))
    condition = f.WhichOneof("condition")
    if condition == "exists":
        params.append(path)
        return f"(json_type(metadata, ?) IS {'NOT ' if f.exists else ''}NULL)"
    params.append(path)  # json_each's argument comes before the test's parameters
    if condition == "equals":
        test = _equals(f.equals, params)
    elif condition == "one_of":
        test = _one_of(filter_tree.one_of_values(f), params)
    elif condition in ("range", "time_range"):
        expr = _NUMBER + " AND value" if condition == "range" else _SECONDS
        tests = []
        for _, op, number in filter_tree.bounds(f):
            params.append(number)
            tests.append(f"{expr} {op} ?")
        test = "(" + " AND ".join(tests) + ")"
    else:
        raise filter_tree.no_condition(f.key)
    return f"EXISTS (SELECT 1 FROM json_each(metadata, ?) WHERE {test})"


def _equals(value: struct_pb2.Value, params: list) -> str:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        params.append(value.string_value)
        return "(type = 'text' AND value = ?)"
    if kind == "number_value":
        params.append(filter_tree.finite(value.number_value, "equals"))
        return f"({_NUMBER} AND value = ?)"
    if kind == "bool_value":
        return "(type = 'true')" if value.bool_value else "(type = 'false')"
    if kind == "null_value":
        return "(type = 'null')"
    raise filter_tree.not_a_scalar()


def _one_of(values, params: list) -> str:
    """Membership as SQL IN lists, one per JSON type: a flat expression however many values."""
    strings = [v.string_value for v in values if v.WhichOneof("kind") == "string_value"]
    numbers = [filter_tree.finite(v.number_value, "one_of") for v in values
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
