"""A small bounded LRU map, safe to share between the event loop and worker threads.

The encoder keeps recent query texts' embeddings in one, the analysis RPCs their label
vectors and duplicate groups: each is a few entries looked up far more often than made.
"""

from __future__ import annotations

import collections
import threading
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """At most `size` entries (none when size <= 0); the least recently used goes first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: collections.OrderedDict[K, V] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
