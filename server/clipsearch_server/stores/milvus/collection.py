"""One collection kept in Milvus: Milvus Lite (a local file), standalone or distributed.

Each clipsearch collection is one Milvus collection named `cs_<name>` (Milvus names allow only
letters, digits and '_', so '_', '-' and '.' are spelt `_u`, `_h`, `_d`), with fields

    id VARCHAR primary key | vector FLOAT_VECTOR (HNSW, COSINE) | meta JSON (the metadata)
    x JSON (the typed shadow that filters test, filters.py) | thumb VARCHAR (base64 WebP)

and the collection's settings (dimension, model fingerprint, HNSW M and efConstruction,
creation time, thumbnail size, multi-value paths) as collection properties, so every front
reads the same ones. Reads use Strong consistency: a front sees every write acknowledged
before the read began (its own and other fronts'). A Milvus server acknowledges a write once
it is in its write-ahead log (the message stream); on a Milvus Lite file every write is also
flushed before it is acknowledged, because Lite's own log lost rows when the front was killed.
See README "Scaling out".
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator

import numpy as np

from ... import analysis
from ...errors import ClipSearchError, NotFound, Unavailable
from ...thumbnails import DEFAULT_THUMBNAIL_SIZE
from ..base import CollectionChecks, CollectionInfo, Duplicates, NewItem, Record, SearchHit
from .filters import MATCH_ALL, MilvusFilter, compile_milvus_filter, multi_paths, shadow_of

log = logging.getLogger(__name__)

PREFIX = "cs_"
MAX_ID_BYTES = 2048  # 512 characters of UTF-8
MAX_THUMB_CHARS = 65_535  # Milvus's VARCHAR limit; larger thumbnails are not kept
READ_CHUNK = 1000  # rows per query page
SEARCH_CHUNK = 256  # query vectors per batched search (FindDuplicates)
PROPS = "clipsearch."
_FIELDS = ["id", "vector", "meta"]
_SPELLING = {"_": "_u", "-": "_h", ".": "_d"}


def milvus_name(name: str) -> str:
    return PREFIX + "".join(_SPELLING.get(ch, ch) for ch in name)


@contextlib.contextmanager
def engine(what: str) -> Iterator[None]:
    """Milvus's failures as the statuses a client can act on."""
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except ClipSearchError:
        raise
    except MilvusException as exc:
        text = str(exc)
        if "collection not found" in text.lower() or "can't find collection" in text.lower():
            raise NotFound(f"{what}: the collection no longer exists") from exc
        log.warning("%s failed in Milvus: %s", what, exc)
        raise Unavailable(f"{what} failed in Milvus: {exc}") from exc
    except (ConnectionError, OSError) as exc:
        raise Unavailable(f"{what}: Milvus cannot be reached ({exc})") from exc


class MilvusCollection(CollectionChecks):
    """One clipsearch collection as a Milvus collection."""

    def __init__(self, client: object, name: str, props: dict[str, str],
                 flush_each_write: bool = False) -> None:
        self.client = client
        # Milvus Lite: its write-ahead log lost acknowledged rows when the front was killed
        # (tests/e2e/test_durability.py), so a write is acknowledged only once flushed.
        self.flush_each_write = flush_each_write
        self.name = name
        self.milvus_name = milvus_name(name)
        self.dim = int(props[PROPS + "dim"])
        self.model_fingerprint = props[PROPS + "fingerprint"]
        self.m = int(props[PROPS + "m"])
        self.ef_construction = int(props[PROPS + "ef_construction"])
        self.created_at = float(props[PROPS + "created_at"])
        self.thumbnail_size = int(props.get(PROPS + "thumbnail_size", DEFAULT_THUMBNAIL_SIZE))
        self._multi = set(json.loads(props.get(PROPS + "multi_paths", "[]")))
        self._lock = threading.Lock()
        self._unflushed = False  # written since the last flush
        # Lite's flush is not safe beside another write or flush of the same collection
        # ("current_seq is monotonic"): on a Lite file, a write and its flush go one at a time.
        self._writes: contextlib.AbstractContextManager = (
            threading.RLock() if flush_each_write else contextlib.nullcontext())

    # --- writes ---------------------------------------------------------------------------
    def upsert(self, items: list[NewItem]) -> int:
        if not items:
            return 0
        for item in items:
            self.check_vector(item.vector)
        last = {item.id: item for item in items}  # an id repeated in one batch: the last wins
        rows, multi = [], set()
        for item in last.values():
            shadow = shadow_of(item.metadata)
            multi |= multi_paths(shadow)
            rows.append({"id": item.id, "vector": item.vector.astype(np.float32).tolist(),
                         "meta": item.metadata, "x": shadow, "thumb": _thumb_text(item)})
        with self._writes, engine(f"upsert into {self.name}"):
            if not multi <= self._multi:  # before the rows: a filter must never see them first
                self._add_multi_paths(multi)
            for start in range(0, len(rows), READ_CHUNK):
                self.client.upsert(self.milvus_name, rows[start:start + READ_CHUNK])
            self._written()
        return len(items)

    def _written(self) -> None:
        self._unflushed = True
        if self.flush_each_write:
            self.flush()

    def flush(self, force: bool = False) -> bool:
        """Seal what was written so Milvus indexes it: until then a search scans the growing
        segment row by row (measured: 0.5 s at 10k rows against milliseconds once indexed).
        A Milvus server's writes are durable without it; a Lite file's are not (see
        `flush_each_write`). True when flushed."""
        with self._writes:
            if not (force or self._unflushed):
                return False
            self._unflushed = False
            with engine(f"flush {self.name}"):
                self.client.flush(self.milvus_name)
        return True

    def _add_multi_paths(self, paths: set[str]) -> None:
        with self._lock:
            self._multi |= self._read_multi() | paths
            self.client.alter_collection_properties(
                self.milvus_name,
                properties={PROPS + "multi_paths": json.dumps(sorted(self._multi))})

    def _read_multi(self) -> set[str]:
        props = self.client.describe_collection(self.milvus_name).get("properties", {})
        return set(json.loads(props.get(PROPS + "multi_paths", "[]")))

    def delete(self, ids: list[str]) -> int:
        with self._writes, engine(f"delete from {self.name}"):
            existing = [r["id"] for r in self.client.get(self.milvus_name, ids=list(set(ids)),
                                                         output_fields=["id"])]
            if existing:
                self.client.delete(self.milvus_name, ids=existing)
                self._written()
        return len(existing)

    def set_metadata_key(self, values: dict[str, object], key: str) -> int:
        changed = 0
        keys = list(values)
        for start in range(0, len(keys), READ_CHUNK):
            with self._writes, engine(f"label items of {self.name}"):
                rows = self.client.get(self.milvus_name, ids=keys[start:start + READ_CHUNK],
                                       output_fields=["id", "vector", "meta", "thumb"])
                for row in rows:
                    row["meta"] = {**row["meta"], key: values[row["id"]]}
                    row["x"] = shadow_of(row["meta"])
                    row["vector"] = [float(v) for v in row["vector"]]
                if rows:
                    self.client.upsert(self.milvus_name, rows)
                    self._written()
            changed += len(rows)
        return changed

    # --- reads ----------------------------------------------------------------------------
    def info(self) -> CollectionInfo:
        return CollectionInfo(self.name, self.count(), self.dim, self.model_fingerprint, self.m,
                              self.ef_construction, self.created_at, self.thumbnail_size)

    def count(self) -> int:
        return self.count_matching(MATCH_ALL)

    def count_matching(self, where: MilvusFilter) -> int:
        with engine(f"count {self.name}"):
            rows = self.client.query(self.milvus_name, filter=where.expr,
                                     output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def get(self, ids: list[str]) -> dict[str, Record]:
        found: dict[str, Record] = {}
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), READ_CHUNK):
            with engine(f"get from {self.name}"):
                rows = self.client.get(self.milvus_name, ids=unique[start:start + READ_CHUNK],
                                       output_fields=_FIELDS)
            found.update((r["id"], _record(r)) for r in rows)
        return found

    def thumbnails(self, ids: list[str]) -> dict[str, bytes]:
        with engine(f"thumbnails of {self.name}"):
            rows = self.client.get(self.milvus_name, ids=list(dict.fromkeys(ids)),
                                   output_fields=["id", "thumb"])
        return {r["id"]: base64.b64decode(r["thumb"]) for r in rows if r["thumb"]}

    def compile_filter(self, tree: object) -> MilvusFilter:
        if tree is None:
            return MATCH_ALL
        return compile_milvus_filter(tree, self._multi_now())

    def _multi_now(self) -> set[str]:
        """Multi-value paths, including those another front's writes added."""
        with engine(f"read settings of {self.name}"):
            fresh = self._read_multi()
        with self._lock:
            self._multi |= fresh
            return set(self._multi)

    def search(self, vector: np.ndarray, k: int, ef: int, where: MilvusFilter = MATCH_ALL
               ) -> list[SearchHit]:
        self.check_vector(vector)
        return self._search(vector[None, :], k, ef, where, _FIELDS)[0]

    def _search(self, vectors: np.ndarray, k: int, ef: int, where: MilvusFilter,
                fields: list[str]) -> list[list[SearchHit]]:
        with engine(f"search {self.name}"):
            found = self.client.search(
                self.milvus_name, data=vectors.astype(np.float32).tolist(), limit=k,
                filter=where.expr, output_fields=fields,
                search_params={"metric_type": "COSINE", "params": {"ef": max(ef, k)}})
        return [[SearchHit(h["entity"]["id"], float(h["distance"]), h["entity"].get("meta", {}),
                           np.asarray(h["entity"].get("vector", ()), np.float32))
                 for h in hits] for hits in found]

    def page(self, where: MilvusFilter, after_id: str | None, limit: int) -> list[Record]:
        expr = where.expr
        if after_id is not None:
            after = f"id > {json.dumps(after_id)}"
            expr = f"({after}) and ({expr})" if expr else after
        # A plain query with a limit returns some matching rows, not the first ones; the
        # query iterator walks the primary key in order.
        with engine(f"list {self.name}"):
            iterator = self.client.query_iterator(self.milvus_name, batch_size=limit,
                                                  limit=limit, filter=expr,
                                                  output_fields=_FIELDS)
            try:
                rows = iterator.next()
            finally:
                iterator.close()
        return sorted((_record(r) for r in rows), key=lambda r: r.id)

    def read_vectors(self, where: MilvusFilter) -> tuple[list[str], np.ndarray]:
        ids: list[str] = []
        vectors: list[list[float]] = []
        with engine(f"read {self.name}"):
            iterator = self.client.query_iterator(self.milvus_name, batch_size=READ_CHUNK,
                                                  filter=where.expr,
                                                  output_fields=["id", "vector"])
            try:
                while batch := iterator.next():
                    ids.extend(r["id"] for r in batch)
                    vectors.extend(r["vector"] for r in batch)
            finally:
                iterator.close()
        return ids, np.asarray(vectors, np.float32).reshape(len(ids), self.dim)

    def records_by_key(self, keys: list[str]) -> dict[str, Record]:
        return self.get(keys)

    def find_duplicates(self, where: MilvusFilter, threshold: float, neighbours: int, ef: int,
                        check: Callable[[], None]) -> Duplicates:
        """Each matching item's nearest neighbours from Milvus's graph, joined into groups."""
        ids, vectors = self.read_vectors(where)
        if len(ids) < 2:
            return Duplicates([], {}, len(ids))
        k = min(neighbours + 1, len(ids))  # +1: an item is its own nearest
        row_of = {id_: row for row, id_ in enumerate(ids)}
        found = np.full((len(ids), k), -1, np.int64)
        sims = np.zeros((len(ids), k), np.float32)
        for start in range(0, len(ids), SEARCH_CHUNK):
            check()
            hits = self._search(vectors[start:start + SEARCH_CHUNK], k, ef, where, ["id"])
            for offset, row_hits in enumerate(hits):
                for j, hit in enumerate(row_hits[:k]):
                    found[start + offset, j] = row_of.get(hit.id, -1)
                    sims[start + offset, j] = hit.score
        groups = analysis.duplicate_groups(vectors, found, sims, threshold)
        members = {row for g in groups for row in g.members}
        return Duplicates(groups, {row: ids[row] for row in members}, len(ids))

    def cache_version(self) -> None:
        return None  # other fronts may write: nothing derived is cached


def _thumb_text(item: NewItem) -> str:
    if not item.thumbnail:
        return ""
    text = base64.b64encode(item.thumbnail).decode()
    if len(text) > MAX_THUMB_CHARS:
        log.warning("thumbnail of %r is %d bytes, over what Milvus keeps; not stored",
                    item.id, len(item.thumbnail))
        return ""
    return text


def _record(row: dict) -> Record:
    return Record(row["id"], 0, np.asarray(row["vector"], np.float32), row.get("meta") or {})
