"""The Milvus collection store: each collection in Milvus (a Lite file, standalone or
distributed). `registry.py` keeps the collections of one database, `collection.py` one of
them, `filters.py` writes filters as Milvus expressions over a typed shadow of the metadata.
"""

from .collection import MilvusCollection
from .registry import MilvusCollections

__all__ = ["MilvusCollection", "MilvusCollections"]
