"""Every clipsearch collection in one Milvus database: found by their properties, loaded,
created with the schema collection.py describes, and dropped by name.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

from ...errors import AlreadyExists, ClipSearchError, NotFound
from ...thumbnails import DEFAULT_THUMBNAIL_SIZE
from ..base import check_name
from .collection import (
    MAX_ID_BYTES,
    MAX_THUMB_CHARS,
    PREFIX,
    PROPS,
    MilvusCollection,
    engine,
    milvus_name,
)

log = logging.getLogger(__name__)
LOAD_TRIES = 3  # loading a collection into memory, see _load_into_memory
LOAD_RETRY_S = 0.5  # the first wait between tries; it doubles


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

        with engine(f"connect to {self.uri}"):
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
        with engine(f"open collection {name}"):
            if not self.client.has_collection(mname):
                raise NotFound(f"collection {name!r} does not exist")
            props = self.client.describe_collection(mname).get("properties", {})
            if props.get(PROPS + "name") != name:
                raise NotFound(f"collection {name!r} does not exist")
            started = time.perf_counter()
            self._load_into_memory(mname)
        collection = MilvusCollection(self.client, name, props, self.embedded)
        with self._lock:
            collection = self._open.setdefault(name, collection)
        log.info("collection %s: opened in Milvus (%s) in %.2fs", name, mname,
                 time.perf_counter() - started)
        return collection

    def _load_into_memory(self, mname: str) -> None:
        """load_collection, tried again after an engine error. Milvus Lite restarted after a
        SIGKILL has failed its first read of an index file ('Resource temporarily
        unavailable') once in CI; the second read works."""
        from pymilvus.exceptions import MilvusException

        for attempt in range(LOAD_TRIES):
            try:
                self.client.load_collection(mname)
                return
            except MilvusException as exc:
                if attempt == LOAD_TRIES - 1:
                    raise
                log.warning("loading %s failed in Milvus (%s); trying again", mname, exc)
                time.sleep(LOAD_RETRY_S * 2 ** attempt)

    def names(self) -> list[str]:
        with engine("list collections"):
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
        with engine(f"create collection {name}"):
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
        with engine(f"drop collection {name}"):
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
