"""One collection's durable records in SQLite: the source of truth.

WAL mode with synchronous=FULL: a write is acknowledged only after its transaction is on disk,
so a crash (or kill) of the server loses nothing that a client was told was written. Every
write batch takes the next sequence number; each item row and each deletion records the
sequence that wrote it, so the HNSW index (derived data) can tell what it is missing.

Labels are the integers hnswlib knows items by. They come from a counter that never goes
back, so a label marked deleted in a graph is never handed to a different item.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..base import NewItem, Record
from .sql_filters import MATCH_ALL, SqlFilter

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    label INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    metadata TEXT NOT NULL,
    seq INTEGER NOT NULL
);
-- Vectors live apart from metadata so that a filter's full scan reads metadata pages only.
CREATE TABLE IF NOT EXISTS vectors (label INTEGER PRIMARY KEY, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS items_by_seq ON items (seq);
CREATE TABLE IF NOT EXISTS deletions (label INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
-- Small WebP previews of image items, apart so that searches and scans never read them.
CREATE TABLE IF NOT EXISTS thumbnails (label INTEGER PRIMARY KEY, webp BLOB NOT NULL);
"""


class Store:
    """Durable items of one collection. Thread-safe; one connection, serialised by a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    @staticmethod
    def peek_meta(path: Path) -> dict[str, str]:
        """A store's settings, read without opening it for writing.

        Empty only when the store is readable and provably has no settings (no meta table
        yet, or no rows in it): a create killed before its commit. Any other failure (a
        damaged file, a lock held by another process, no descriptors left) raises
        sqlite3.Error, so that a caller never mistakes an unreadable store for an empty one.
        """
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            tables = {row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "meta" not in tables:
                return {}
            return dict(db.execute("SELECT key, value FROM meta").fetchall())
        finally:
            db.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- metadata of the collection itself -------------------------------------------------
    def read_meta(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def write_meta(self, values: dict[str, str]) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                list(values.items()),
            )

    def _meta_int(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta_int(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, str(value)),
        )

    @property
    def seq(self) -> int:
        """Sequence number of the last committed write."""
        with self._lock:
            return self._meta_int("seq")

    # --- writes -----------------------------------------------------------------------------
    def upsert(self, items: list[NewItem]) -> tuple[int, list[int], int]:
        """Commit items; returns (sequence number, label of each item in order, ids created)."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            seq = self._meta_int("seq") + 1
            next_label = self._meta_int("next_label")
            labels: list[int] = []
            for item in items:
                row = self._db.execute(
                    "SELECT label FROM items WHERE id = ?", (item.id,)).fetchone()
                if row is None:
                    label = next_label
                    next_label += 1
                else:
                    label = row[0]
                self._db.execute(
                    "INSERT INTO items(label, id, metadata, seq) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(label) DO UPDATE SET metadata = excluded.metadata, "
                    "seq = excluded.seq",
                    (label, item.id, _dump(item.metadata), seq),
                )
                self._db.execute(
                    "INSERT INTO vectors(label, vector) VALUES (?, ?) "
                    "ON CONFLICT(label) DO UPDATE SET vector = excluded.vector",
                    (label, _vector_bytes(item.vector)),
                )
                if item.thumbnail is None:
                    self._db.execute("DELETE FROM thumbnails WHERE label = ?", (label,))
                else:
                    self._db.execute("INSERT OR REPLACE INTO thumbnails(label, webp) VALUES (?, ?)",
                                     (label, item.thumbnail))
                labels.append(label)
            created = next_label - self._meta_int("next_label")
            self._set_meta_int("seq", seq)
            self._set_meta_int("next_label", next_label)
            return seq, labels, created

    def delete(self, ids: list[str]) -> tuple[int, list[int]]:
        """Delete ids that exist; returns (sequence number, labels removed)."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            labels = [
                row[0]
                for id_ in dict.fromkeys(ids)
                if (row := self._db.execute("SELECT label FROM items WHERE id = ?", (id_,))
                    .fetchone()) is not None
            ]
            seq = self._meta_int("seq")
            if not labels:
                return seq, []
            seq += 1
            self._db.executemany("DELETE FROM items WHERE label = ?", [(lb,) for lb in labels])
            self._db.executemany("DELETE FROM vectors WHERE label = ?", [(lb,) for lb in labels])
            self._db.executemany("DELETE FROM thumbnails WHERE label = ?",
                                 [(lb,) for lb in labels])
            self._db.executemany(
                "INSERT OR REPLACE INTO deletions(label, seq) VALUES (?, ?)",
                [(lb, seq) for lb in labels],
            )
            self._set_meta_int("seq", seq)
            return seq, labels

    def set_metadata_key(self, values: dict[int, object], key: str) -> tuple[int, int]:
        """Set `key` in the metadata of these labels (those still stored), one transaction;
        returns (sequence number, items changed). Vectors are untouched."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            seq = self._meta_int("seq") + 1
            changed = 0
            for chunk in _chunks(list(values)):
                rows = self._db.execute(
                    f"SELECT label, metadata FROM items WHERE label IN ({_marks(chunk)})",
                    chunk).fetchall()
                updates = []
                for label, metadata in rows:
                    merged = json.loads(metadata)
                    merged[key] = values[label]
                    updates.append((_dump(merged), seq, label))
                self._db.executemany(
                    "UPDATE items SET metadata = ?, seq = ? WHERE label = ?", updates)
                changed += len(updates)
            self._set_meta_int("seq", seq)
            return seq, changed

    def forget_deletions_through(self, seq: int) -> None:
        """Deletions up to `seq` are inside a durable index snapshot; the log can drop them."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM deletions WHERE seq <= ?", (seq,))

    # --- reads ------------------------------------------------------------------------------
    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def get_by_ids(self, ids: list[str]) -> dict[str, Record]:
        found: dict[str, Record] = {}
        for chunk in _chunks(list(dict.fromkeys(ids))):
            with self._lock:
                rows = self._db.execute(
                    f"{_RECORD_SELECT} WHERE items.id IN ({_marks(chunk)})", chunk).fetchall()
            found.update((row[0], _record(row)) for row in rows)
        return found

    def thumbnails(self, ids: list[str]) -> dict[str, bytes]:
        """The stored thumbnails of these ids (ids without one are left out)."""
        found: dict[str, bytes] = {}
        for chunk in _chunks(list(dict.fromkeys(ids))):
            with self._lock:
                rows = self._db.execute(
                    "SELECT items.id, thumbnails.webp FROM items JOIN thumbnails USING (label) "
                    f"WHERE items.id IN ({_marks(chunk)})", chunk).fetchall()
            found.update(rows)
        return found

    def get_by_labels(self, labels: list[int]) -> dict[int, Record]:
        found: dict[int, Record] = {}
        for chunk in _chunks(labels):
            with self._lock:
                rows = self._db.execute(
                    f"{_RECORD_SELECT} WHERE items.label IN ({_marks(chunk)})", chunk).fetchall()
            found.update((row[1], _record(row)) for row in rows)
        return found

    def vectors_for(self, labels: np.ndarray) -> np.ndarray:
        """The vectors of these labels, one row each in the same order."""
        out = np.empty((len(labels), 0), dtype=np.float32)
        position = {int(label): i for i, label in enumerate(labels.tolist())}
        for chunk in _chunks(labels.tolist()):
            with self._lock:
                rows = self._db.execute(
                    f"SELECT label, vector FROM vectors WHERE label IN ({_marks(chunk)})",
                    chunk).fetchall()
            for label, blob in rows:
                row = np.frombuffer(blob, dtype="<f4")
                if out.shape[1] == 0:
                    out = np.empty((len(labels), len(row)), dtype=np.float32)
                out[position[label]] = row
        return out

    def labels_matching(self, where: SqlFilter) -> np.ndarray:
        """Labels of the items a filter matches, ascending."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT label FROM items WHERE {where.where} ORDER BY label", where.params)
            return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def count_matching(self, where: SqlFilter) -> int:
        with self._lock:
            return self._db.execute(
                f"SELECT COUNT(*) FROM items WHERE {where.where}", where.params).fetchone()[0]

    def page(self, where: SqlFilter = MATCH_ALL, after_id: str | None = None, limit: int = 100
             ) -> list[Record]:
        """Up to `limit` items in id order, starting after `after_id`."""
        cond, params = where.where, where.params
        if after_id is not None:
            cond, params = f"({cond}) AND id > ?", (*params, after_id)
        with self._lock:
            rows = self._db.execute(
                f"{_RECORD_SELECT} WHERE {cond} ORDER BY items.id LIMIT ?",
                (*params, limit)).fetchall()
        return [_record(r) for r in rows]

    def changes_after(self, seq: int, chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(labels, vectors) of items written after `seq`, in chunks."""
        last = -1
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT items.label, vectors.vector FROM items JOIN vectors USING (label) "
                    "WHERE items.seq > ? AND items.label > ? ORDER BY items.label LIMIT ?",
                    (seq, last, chunk),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            labels = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            yield labels, np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows])

    def deletions_after(self, seq: int) -> list[int]:
        with self._lock:
            rows = self._db.execute("SELECT label FROM deletions WHERE seq > ?", (seq,))
            return [r[0] for r in rows.fetchall()]


_RECORD_SELECT = ("SELECT items.id, items.label, vectors.vector, items.metadata "
                  "FROM items JOIN vectors USING (label)")
_CHUNK = 500  # under SQLite's limit on bound parameters


def _chunks(values: list) -> Iterator[list]:
    for start in range(0, len(values), _CHUNK):
        yield values[start:start + _CHUNK]


def _marks(values: list) -> str:
    return ", ".join("?" * len(values))


def _vector_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def _dump(metadata: dict) -> str:
    return json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _record(row: tuple) -> Record:
    id_, label, blob, metadata = row
    return Record(id=id_, label=label, vector=np.frombuffer(blob, dtype="<f4"),
                  metadata=json.loads(metadata))
