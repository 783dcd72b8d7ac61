"""Argument checks that the client's methods share: each one raises before any call starts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import struct_pb2

from clipsearch.images import ImageInput, _check_images
from clipsearch.results import encode_vector, metadata_to_struct


def _strings(
    values: Sequence[str], name: str, each: str, *, length: int | None = None
) -> list[str]:
    """A list of str, or a TypeError naming the argument (one str is a common slip).

    With ``length``, a ValueError too when there are not that many (one per id).
    """
    if isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of strings, not one string")
    values = list(values)
    if length is not None:
        _check_length(name, len(values), length)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{each} {i} must be a str, got {type(value).__name__}")
    return values


def _check_length(name: str, got: int, want: int) -> None:
    if got != want:
        raise ValueError(f"{name} has {got} entries but ids has {want}")


def _exactly_one(**named: object) -> str:
    """The name of the one argument that is not None; a ValueError when it is not one."""
    given = [name for name, value in named.items() if value is not None]
    if len(given) != 1:
        *first, last = named
        raise ValueError(f"give exactly one of {', '.join(first)} or {last} (got {given or 0})")
    return given[0]


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _upsert_content(
    n: int,
    *,
    images: Sequence[ImageInput] | None,
    texts: Sequence[str] | None,
    vectors: Any,
) -> tuple[str, list[Any]]:
    """The one content that upsert was given, as (Item field, a value per id): texts, checked
    images (read later, a batch at a time) or wire vectors."""
    if texts is not None:
        return "text", _strings(texts, "texts", "text", length=n)
    if images is not None:
        checked = _check_images(images)
        _check_length("images", len(checked), n)
        return "image", checked
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 0)
    if arr.ndim != 2:
        raise ValueError(f"vectors must be 2-D (n, dim), got shape {arr.shape}")
    _check_length("vectors", arr.shape[0], n)
    return "vector", [encode_vector(row) for row in arr]


def _metadata_structs(
    n: int, metadata: Sequence[Mapping[str, Any] | None] | None
) -> list[struct_pb2.Struct | None]:
    """Upsert's metadata as Structs (None where an item has none), one per id."""
    if metadata is None:
        return [None] * n
    metadata = list(metadata)
    _check_length("metadata", len(metadata), n)
    return [metadata_to_struct(m) if m is not None else None for m in metadata]
