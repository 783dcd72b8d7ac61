"""Metadata filters written as plain dicts, compiled to the API's typed filter tree.

The dict form reads like a MongoDB query::

    {"album": "2024"}                                  # equals
    {"year": {"$gte": 2020, "$lt": 2024}}              # number range
    {"taken": {"$gte": datetime(2021, 1, 1, tzinfo=timezone.utc)}}   # time range
    {"tags": {"$in": ["beach", "sea"]}}                # any of these values
    {"exif.camera": {"$exists": True}}                 # dotted keys reach nested objects
    {"$or": [{"album": "a"}, {"album": "b"}]}, {"$not": {"album": "c"}}

Several keys in one dict must all match. A field holding a list matches when any element does.
Range bounds that are `datetime` objects make a time range; metadata times may be stored as
epoch seconds or ISO 8601 strings.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import struct_pb2

from clipsearch.v1 import clipsearch_pb2 as pb

FilterSpec = Mapping[str, Any]
_RANGE_OPS = {"$gt": "gt", "$gte": "gte", "$lt": "lt", "$lte": "lte"}
_LOGIC_OPS = {"$and": "all_of", "$or": "any_of", "$nor": "none_of"}


def to_filter(spec: FilterSpec | pb.Filter) -> pb.Filter:
    """Compile a dict filter (or pass a `clipsearch.v1.Filter` through)."""
    if isinstance(spec, pb.Filter):
        return spec
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"a filter is a non-empty dict, got {spec!r}")
    parts = [_entry(key, value) for key, value in spec.items()]
    return parts[0] if len(parts) == 1 else pb.Filter(all_of=pb.FilterList(filters=parts))


def _entry(key: str, value: Any) -> pb.Filter:
    if key in _LOGIC_OPS:
        if not isinstance(value, Sequence) or isinstance(value, str) or not value:
            raise ValueError(f"{key} takes a non-empty list of filters")
        children = pb.FilterList(filters=[to_filter(v) for v in value])
        return pb.Filter(**{_LOGIC_OPS[key]: children})
    if key == "$not":
        return pb.Filter(none_of=pb.FilterList(filters=[to_filter(value)]))
    if key.startswith("$"):
        raise ValueError(f"unknown filter operator {key!r}")
    if isinstance(value, Mapping) and any(str(k).startswith("$") for k in value):
        return _operators(key, value)
    return pb.Filter(field=pb.FieldFilter(key=key, equals=_scalar(key, value)))


def _operators(key: str, ops: Mapping[str, Any]) -> pb.Filter:
    conditions: list[pb.Filter] = []
    bounds = {op: v for op, v in ops.items() if op in _RANGE_OPS}
    if bounds:
        conditions.append(pb.Filter(field=_range(key, bounds)))
    for op, value in ops.items():
        if op in _RANGE_OPS:
            continue
        field = pb.FieldFilter(key=key)
        if op == "$eq":
            field.equals.CopyFrom(_scalar(key, value))
        elif op == "$in":
            if isinstance(value, str) or not isinstance(value, Sequence) or not value:
                raise ValueError(f"$in on {key!r} takes a non-empty list")
            field.one_of.values.extend(_scalar(key, v) for v in value)
        elif op == "$exists":
            field.exists = bool(value)
        else:
            raise ValueError(f"unknown operator {op!r} on {key!r}")
        conditions.append(pb.Filter(field=field))
    if len(conditions) == 1:
        return conditions[0]
    return pb.Filter(all_of=pb.FilterList(filters=conditions))


def _range(key: str, bounds: Mapping[str, Any]) -> pb.FieldFilter:
    values = list(bounds.values())
    if all(isinstance(v, dt.datetime) for v in values):
        time_range = pb.TimeRange()
        for op, v in bounds.items():
            if v.tzinfo is None:
                raise ValueError(f"{op} on {key!r}: use a timezone-aware datetime")
            getattr(time_range, _RANGE_OPS[op]).FromDatetime(v)
        return pb.FieldFilter(key=key, time_range=time_range)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        number_range = pb.NumberRange(**{_RANGE_OPS[op]: float(v) for op, v in bounds.items()})
        return pb.FieldFilter(key=key, range=number_range)
    raise ValueError(f"range bounds on {key!r} must all be numbers or all be datetimes")


def _scalar(key: str, value: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    if value is None:
        v.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        v.bool_value = value
    elif isinstance(value, (int, float)):
        v.number_value = float(value)
    elif isinstance(value, str):
        v.string_value = value
    else:
        raise ValueError(f"filter value for {key!r} must be a str, number, bool or None")
    return v


def stored_time(value: dt.datetime | dt.date) -> str:
    """The form a metadata time is stored in: ISO 8601 text in UTC ending in 'Z', e.g.
    '2021-06-01T12:30:00Z' ('2021-06-01' for a date). The server's time ranges read it back
    as seconds since the epoch, so datetime bounds compare with it exactly."""
    if not isinstance(value, dt.datetime):
        return value.isoformat()
    if value.tzinfo is None:
        raise TypeError(f"metadata time {value!r} has no timezone: use a timezone-aware "
                        "datetime, e.g. datetime(..., tzinfo=timezone.utc)")
    utc = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds" if utc.microsecond else "seconds") + "Z"


def with_stored_times(value: Any) -> Any:
    """A copy of JSON-like metadata with every datetime/date turned into its stored text."""
    if isinstance(value, (dt.datetime, dt.date)):
        return stored_time(value)
    if isinstance(value, Mapping):
        return {k: with_stored_times(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [with_stored_times(v) for v in value]
    return value
