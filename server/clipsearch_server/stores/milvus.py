"""Collections kept in Milvus: Milvus Lite (a local file), standalone or distributed.

Each clipsearch collection is one Milvus collection named `cs_<name>` (Milvus names allow only
letters, digits and '_', so '_', '-' and '.' are spelt `_u`, `_h`, `_d`), with fields

    id VARCHAR primary key | vector FLOAT_VECTOR (HNSW, COSINE) | meta JSON (the metadata)
    x JSON (the typed shadow that filters test, milvus_filters.py) | thumb VARCHAR (base64 WebP)

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
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .. import analysis
from ..errors import AlreadyExists, ClipSearchError, NotFound, Unavailable
from ..store import NewItem, Record
from ..thumbnails import DEFAULT_THUMBNAIL_SIZE
from .base import (
    CollectionInfo,
    Duplicates,
    SearchHit,
    check_model,
    check_name,
    check_vector,
)
from .milvus_filters import MATCH_ALL, MilvusFilter, compile_milvus_filter, multi_paths, shadow_of

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
def _engine(what: str) -> Iterator[None]:
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


class MilvusCollection:
    """One clipsearch collection as a Milvus collection."""

    def __init__(self, client: object, name: str, props: dict[str, str],
                 flush_each_write: bool = False) -> None:
        self.client = client
        # Milvus Lite: its write-ahead log lost acknowledged rows when the front was killed
        # (tests/test_durability.py), so a write is acknowledged only once flushed.
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
        with self._writes, _engine(f"upsert into {self.name}"):
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
            with _engine(f"flush {self.name}"):
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
        with self._writes, _engine(f"delete from {self.name}"):
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
            with self._writes, _engine(f"label items of {self.name}"):
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
        with _engine(f"count {self.name}"):
            rows = self.client.query(self.milvus_name, filter=where.expr,
                                     output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def get(self, ids: list[str]) -> dict[str, Record]:
        found: dict[str, Record] = {}
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), READ_CHUNK):
            with _engine(f"get from {self.name}"):
                rows = self.client.get(self.milvus_name, ids=unique[start:start + READ_CHUNK],
                                       output_fields=_FIELDS)
            found.update((r["id"], _record(r)) for r in rows)
        return found

    def thumbnails(self, ids: list[str]) -> dict[str, bytes]:
        with _engine(f"thumbnails of {self.name}"):
            rows = self.client.get(self.milvus_name, ids=list(dict.fromkeys(ids)),
                                   output_fields=["id", "thumb"])
        return {r["id"]: base64.b64decode(r["thumb"]) for r in rows if r["thumb"]}

    def compile_filter(self, tree: object) -> MilvusFilter:
        if tree is None:
            return MATCH_ALL
        return compile_milvus_filter(tree, self._multi_now())

    def _multi_now(self) -> set[str]:
        """Multi-value paths, including those another front's writes added."""
        with _engine(f"read settings of {self.name}"):
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
        with _engine(f"search {self.name}"):
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
        with _engine(f"list {self.name}"):
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
        with _engine(f"read {self.name}"):
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

    def check_vector(self, vector: np.ndarray) -> None:
        check_vector(self.name, self.dim, vector)

    def check_model(self, fingerprint: str) -> None:
        check_model(self.name, self.model_fingerprint, fingerprint)


class MilvusCollections:
    """Every clipsearch collection in one Milvus database."""

    def __init__(self, uri: str, token: str, dim: int, fingerprint: str, m: int,
                 ef_construction: int) -> None:
        self.uri = uri
        self.token = token
        self.dim = dim
        self.fingerprint = fingerprint
        self.m = m
        self.ef_construction = ef_construction
        self.unavailable: dict[str, str] = {}
        self._open: dict[str, MilvusCollection] = {}
        self._lock = threading.Lock()
        self.client: object | None = None
        self.embedded = "://" not in uri  # a Milvus Lite file, not a server

    def open_all(self) -> None:
        from pymilvus import MilvusClient

        with _engine(f"connect to {self.uri}"):
            if self.embedded:  # Milvus Lite refuses a file whose folder does not exist yet
                Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
            self.client = MilvusClient(uri=self.uri, token=self.token)
            for name in self._names_in_milvus():
                try:
                    self._load(name)
                except ClipSearchError as exc:
                    self.unavailable[name] = str(exc)
                    log.error("collection %s is unavailable: %s", name, exc)

    def _names_in_milvus(self) -> dict[str, str]:
        """clipsearch name -> Milvus name of every clipsearch collection in the database."""
        names = {}
        for mname in self.client.list_collections():
            if mname.startswith(PREFIX):
                props = self.client.describe_collection(mname).get("properties", {})
                name = props.get(PROPS + "name")
                if name and milvus_name(name) == mname:
                    names[name] = mname
        return names

    def _load(self, name: str) -> MilvusCollection:
        """Open a collection Milvus has (loading it into memory), or NotFound."""
        mname = milvus_name(name)
        with _engine(f"open collection {name}"):
            if not self.client.has_collection(mname):
                raise NotFound(f"collection {name!r} does not exist")
            props = self.client.describe_collection(mname).get("properties", {})
            if props.get(PROPS + "name") != name:
                raise NotFound(f"collection {name!r} does not exist")
            started = time.perf_counter()
            self.client.load_collection(mname)
        collection = MilvusCollection(self.client, name, props, self.embedded)
        with self._lock:
            collection = self._open.setdefault(name, collection)
        log.info("collection %s: opened in Milvus (%s) in %.2fs", name, mname,
                 time.perf_counter() - started)
        return collection

    def names(self) -> list[str]:
        with _engine("list collections"):
            return sorted(self._names_in_milvus())

    def find(self, name: str) -> MilvusCollection | None:
        try:
            return self.get(name)
        except NotFound:
            return None

    def get(self, name: str) -> MilvusCollection:
        check_name(name)
        with self._lock:
            collection = self._open.get(name)
        if collection is not None:
            return collection
        return self._load(name)  # created by another front, or NotFound

    def create(self, name: str, m: int = 0, ef_construction: int = 0, exist_ok: bool = False,
               thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE) -> MilvusCollection:
        from pymilvus import DataType, MilvusClient

        check_name(name)
        mname = milvus_name(name)
        m, ef_construction = m or self.m, ef_construction or self.ef_construction
        with _engine(f"create collection {name}"):
            if self.client.has_collection(mname):
                if exist_ok:
                    return self.get(name)
                raise AlreadyExists(f"collection {name!r} already exists")
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            schema.add_field("meta", DataType.JSON)
            schema.add_field("x", DataType.JSON)
            schema.add_field("thumb", DataType.VARCHAR, max_length=MAX_THUMB_CHARS)
            index = self.client.prepare_index_params()
            index.add_index("vector", index_type="HNSW", metric_type="COSINE",
                            params={"M": m, "efConstruction": ef_construction})
            props = {PROPS + "name": name, PROPS + "dim": str(self.dim),
                     PROPS + "fingerprint": self.fingerprint, PROPS + "m": str(m),
                     PROPS + "ef_construction": str(ef_construction),
                     PROPS + "created_at": repr(time.time()),
                     PROPS + "thumbnail_size": str(thumbnail_size),
                     PROPS + "multi_paths": "[]"}
            try:
                self.client.create_collection(mname, schema=schema,
                                              consistency_level="Strong", properties=props)
            except Exception:
                if exist_ok and self.client.has_collection(mname):  # another front won
                    return self.get(name)
                raise
            # sync=False: pymilvus's wait for the index calls AllocTimestamp, which Milvus
            # Lite does not implement (it logs a traceback); loading waits for it anyway.
            self.client.create_index(mname, index, sync=False)
        log.info("created collection %s in Milvus as %s (dim %d, model %s)", name, mname,
                 self.dim, self.fingerprint)
        return self.get(name)

    def drop(self, name: str) -> bool:
        check_name(name)
        mname = milvus_name(name)
        with self._lock:
            self._open.pop(name, None)
        with _engine(f"drop collection {name}"):
            if not self.client.has_collection(mname):
                return False
            self.client.drop_collection(mname)
        log.info("dropped collection %s", name)
        return True

    def counts(self) -> list[tuple[str, int]]:
        with self._lock:
            collections = list(self._open.values())
        out = []
        for c in collections:
            with contextlib.suppress(ClipSearchError):
                out.append((c.name, c.count()))
        return out

    def snapshot_all(self, force: bool = False, budget_s: float | None = None) -> None:
        """Flush collections written since the last call, so that Milvus indexes new rows
        (the snapshot timer's job for the local store: keep restarts and searches fast).
        With `budget_s` (shutting down) none starts after that many seconds: Milvus has the
        rows either way."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        with self._lock:
            collections = list(self._open.values())
        for collection in collections:
            if deadline is not None and time.monotonic() >= deadline:
                return
            try:
                if collection.flush(force):
                    log.debug("collection %s flushed", collection.name)
            except ClipSearchError:
                log.exception("flush of collection %s failed", collection.name)

    def close_all(self) -> None:
        with self._lock:
            self._open.clear()
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()

    def describe(self) -> str:
        return f"Milvus at {self.uri}"


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
