"""The collection-store seam: where vectors, metadata and thumbnails live.

`base.py` is the interface and the types every engine shares; `filter_tree.py` the filter
walk, key rules and limits they share. `local/` keeps SQLite + hnswlib under the data dir (the
default), `milvus/` keeps each collection in Milvus (Lite file, standalone or distributed).
Neither imports the other. `open_collections` is the one place that chooses, from `--store`;
an engine's package is imported only when chosen.
"""

from __future__ import annotations

from ..settings import AnySettings
from .base import CollectionRegistry, CollectionStore

__all__ = ["CollectionRegistry", "CollectionStore", "open_collections"]


def open_collections(settings: AnySettings, dim: int, fingerprint: str) -> CollectionRegistry:
    """The registry `settings.store` names, not yet opened (call `open_all` off the loop)."""
    if settings.store == "milvus":
        from .milvus import MilvusCollections

        uri = settings.store_uri or str(settings.data_dir / "milvus.db")
        return MilvusCollections(uri, settings.store_token, dim, fingerprint,
                                 settings.hnsw_m, settings.hnsw_ef_construction)
    from .local import Collections

    return Collections(settings.data_dir, dim, fingerprint, settings.hnsw_m,
                       settings.hnsw_ef_construction)
