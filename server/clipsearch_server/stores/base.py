"""What the service needs of a collection store, whichever engine keeps the vectors.

Two implementations: `local/` (SQLite as the truth + an hnswlib graph per collection, under
the data dir) and `milvus/` (one Milvus collection per clipsearch collection). Both give the
same answers to the same calls; `tests/unit/test_stores.py` runs one suite over each. This module
imports neither: the types they share (`Record`, `NewItem`, ...) are defined here.

A *key* is how a store names an item internally in whole-collection reads (`read_vectors`,
`records_by_key`, `set_metadata_key`): hnswlib labels for the local store, ids for Milvus.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import FailedPrecondition, InvalidArgument

__all__ = [
    "NAME_PATTERN",
    "CollectionChecks",
    "CollectionInfo",
    "CollectionRegistry",
    "CollectionStore",
    "Duplicates",
    "NewItem",
    "Record",
    "SearchHit",
    "check_name",
]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # use with fullmatch


@dataclass
class Record:
    """A stored item (`label`: the local store's hnswlib label, 0 in Milvus)."""

    id: str
    label: int
    vector: np.ndarray
    metadata: dict


@dataclass
class NewItem:
    """An item to write: its vector is unit length float32."""

    id: str
    vector: np.ndarray
    metadata: dict
    # WebP preview of an image item; None removes any earlier one.
    thumbnail: bytes | None = None


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    count: int
    dim: int
    model_fingerprint: str
    m: int
    ef_construction: int
    created_at: float
    thumbnail_size: int


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float
    metadata: dict
    vector: np.ndarray


@dataclass(frozen=True)
class Duplicates:
    """One FindDuplicates computation, kept so that the following pages need not redo it."""

    groups: list  # of analysis.DuplicateGroup, members are rows
    ids: dict[int, str]  # row -> id, for rows in some group
    compared: int


def check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"collection name {name!r} is not valid: use 1 to 64 letters, digits, '_', '-' or "
            "'.', starting with a letter or digit"
        )


class CollectionChecks:
    """The checks of a collection that every engine makes the same way (a mixin)."""

    name: str
    dim: int
    model_fingerprint: str

    def check_vector(self, vector: np.ndarray) -> None:
        if vector.shape != (self.dim,):
            raise InvalidArgument(
                f"vector has dimension {vector.shape[-1] if vector.ndim else 0}, collection "
                f"{self.name!r} holds dimension {self.dim}"
            )

    def check_model(self, fingerprint: str) -> None:
        """Refuse embeddings from a model other than the one the collection was built with."""
        if fingerprint != self.model_fingerprint:
            raise FailedPrecondition(
                f"collection {self.name!r} was built with model {self.model_fingerprint}, the "
                f"server runs {fingerprint}: its embeddings live in another space. Serve the "
                "original model, or write to a new collection"
            )


class CollectionStore(Protocol):
    """One collection: items with a unit vector, JSON metadata and an optional thumbnail."""

    name: str
    dim: int
    model_fingerprint: str
    thumbnail_size: int

    def info(self) -> CollectionInfo: ...
    def count(self) -> int: ...
    def upsert(self, items: list[NewItem]) -> int:
        """Write items (replacing ids that exist); returns when the engine has them durably."""
        ...
    def delete(self, ids: list[str]) -> int:
        """Remove these ids; absent ones are ignored. Returns how many existed."""
        ...
    def get(self, ids: list[str]) -> dict[str, Record]: ...
    def thumbnails(self, ids: list[str]) -> dict[str, bytes]: ...
    def compile_filter(self, tree: Any) -> Any:
        """The API's filter tree (or None) in this engine's terms; INVALID_ARGUMENT when the
        engine cannot express it."""
        ...
    def search(self, vector: np.ndarray, k: int, ef: int, where: Any) -> list[SearchHit]: ...
    def count_matching(self, where: Any) -> int: ...
    def page(self, where: Any, after_id: str | None, limit: int) -> list[Record]:
        """Matching items in id order, after `after_id`."""
        ...
    def read_vectors(self, where: Any) -> tuple[Sequence[Hashable], np.ndarray]:
        """(keys, vectors) of every matching item, for whole-collection analysis."""
        ...
    def records_by_key(self, keys: list) -> dict[Hashable, Record]: ...
    def set_metadata_key(self, values: dict, key: str) -> int:
        """Set metadata[key] of the items these keys name; returns how many changed."""
        ...
    def find_duplicates(self, where: Any, threshold: float, neighbours: int, ef: int,
                        check: Callable[[], None]) -> Duplicates:
        """Near-duplicate groups; calls `check` between chunks of neighbour queries (it
        raises when the call should stop)."""
        ...
    def cache_version(self) -> int | None:
        """Changes whenever the collection does, or None when this front cannot tell (other
        fronts write too): results derived from the items are then not cached."""
        ...
    def check_vector(self, vector: np.ndarray) -> None: ...
    def check_model(self, fingerprint: str) -> None: ...


class CollectionRegistry(Protocol):
    """Every collection of one store, by name."""

    unavailable: dict[str, str]  # collections that could not be opened: name -> reason

    def open_all(self) -> None: ...
    def names(self) -> list[str]: ...
    def find(self, name: str) -> CollectionStore | None: ...
    def get(self, name: str) -> CollectionStore: ...
    def create(self, name: str, m: int = 0, ef_construction: int = 0, exist_ok: bool = False,
               thumbnail_size: int = ...) -> CollectionStore: ...
    def drop(self, name: str) -> bool: ...
    def counts(self) -> list[tuple[str, int]]: ...
    def snapshot_all(self, force: bool = False, budget_s: float | None = None) -> None:
        """Persist derived state (graphs, Milvus flushes); `budget_s`: shutting down, start
        nothing after that many seconds (the store has every write either way)."""
        ...
    def close_all(self) -> None: ...
    def describe(self) -> str: ...
