"""The local collection store: SQLite as the truth plus an hnswlib graph per collection, under
the data dir (the default engine).

    registry.py     Collections: every collection under <data_dir>/collections
    collection.py   Collection: one store and its graph, kept in step
    scans.py        exact scoring and whole-collection reads (analysis RPCs)
    sqlite.py       the durable records;  sql_filters.py  filters as SQL over JSON metadata
    hnsw.py         the graph, its locking and snapshots;  snapshot_child.py  the forked writer
"""

from .collection import STORE_FILE, Collection
from .registry import Collections

__all__ = ["STORE_FILE", "Collection", "Collections"]
