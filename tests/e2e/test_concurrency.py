"""8 writer and 8 searcher clients against one server for 30 seconds.

No call may fail and the server must stay up. Every search hit must refer to an item that could
exist at that moment: each writer owns a disjoint id prefix and writes one call at a time, so
the history of each id is a sequence of calls with known start and end times, and a hit must
show a version of the item that some instant within the search's own interval allows.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipsearch import Client
from conftest import ServerProcess

DURATION_S = 30.0
WRITERS = 8
SEARCHERS = 8
PRELOAD = 3000
DIM = 64
COLLECTION = "stress"
SEED = 7


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@dataclass
class Op:
    """One acknowledged call on one id: an upsert writes `version` (with `vector`)."""

    start: float
    end: float
    version: int | None  # None: a delete
    vector: np.ndarray | None = None


@dataclass
class Search:
    """One search as the searcher saw it: its interval, query and hits."""

    start: float
    end: float
    query: np.ndarray
    hits: list[tuple[str, float, int]]  # id, score, version from the metadata


@dataclass
class History:
    """Per-id call histories, appended by the id's owner only, under a lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ops: dict[str, list[Op]] = field(default_factory=dict)

    def record(self, ids: list[str], op: list[Op]) -> None:
        with self.lock:
            for id_, o in zip(ids, op, strict=True):
                self.ops.setdefault(id_, []).append(o)

    def problem(self, id_: str, version: int, score: float, search: Search) -> str | None:
        """Why this hit could not be what the collection held during the search, or None."""
        ops = self.ops.get(id_)
        if not ops:
            return f"{id_} was never written"
        for j, op in enumerate(ops):
            if op.version != version:
                continue
            if op.start >= search.end:
                return f"{id_} v{version} was written after the search returned"
            if j + 1 < len(ops) and ops[j + 1].end <= search.start:
                nxt = "deleted" if ops[j + 1].version is None else "replaced"
                return f"{id_} v{version} was {nxt} before the search started"
            assert op.vector is not None
            expected = float(op.vector @ search.query)
            if abs(expected - score) > 1e-4:
                return f"{id_} v{version} scored {score}, its vector gives {expected}"
            return None
        return f"{id_} never had version {version}"


def writer(address: str, n: int, history: History, deadline: float,
           stats: dict[str, int]) -> None:
    """Upserts new ids, replaces and deletes its own ids; knows exactly which exist."""
    rng = np.random.default_rng([SEED, n])
    prefix = f"w{n}-"
    present: set[str] = set()
    gone: list[str] = []
    version = itertools.count(1)
    serial = itertools.count()
    with Client(address, timeout=60) as client:
        while time.monotonic() < deadline:
            roll = rng.random()
            if roll < 0.25 and present:
                ids = rng.choice(sorted(present), size=min(len(present), int(rng.integers(1, 6))),
                                 replace=False).tolist()
                if gone and rng.random() < 0.3:
                    ids.append(gone[int(rng.integers(len(gone)))])  # idempotent delete
                t0 = time.monotonic()
                deleted = client.delete(COLLECTION, ids)
                t1 = time.monotonic()
                assert deleted == len(present.intersection(ids))
                history.record(ids, [Op(t0, t1, None) for _ in ids])
                present.difference_update(ids)
                gone.extend(ids)
                stats["deletes"] += 1
                continue
            if roll < 0.5 and (present or gone):
                pool = sorted(present) + gone
                ids = list(dict.fromkeys(pool[int(i)] for i in
                                         rng.integers(len(pool), size=int(rng.integers(1, 6)))))
            else:
                ids = [f"{prefix}{next(serial)}" for _ in range(int(rng.integers(1, 11)))]
            vectors = rng.normal(size=(len(ids), DIM)).astype(np.float32)
            versions = [next(version) for _ in ids]
            t0 = time.monotonic()
            written = client.upsert(COLLECTION, ids=ids, vectors=vectors,
                                    metadata=[{"w": n, "v": v} for v in versions])
            t1 = time.monotonic()
            assert written == len(ids)
            history.record(ids, [Op(t0, t1, v, u)
                                 for v, u in zip(versions, unit(vectors), strict=True)])
            present.update(ids)
            gone = [i for i in gone if i not in present]
            stats["upserts"] += 1


def searcher(address: str, n: int, base: np.ndarray, deadline: float,
             searches: list[Search]) -> None:
    """Searches by random vectors (random k and ef) and by the id of a preloaded item."""
    rng = np.random.default_rng([SEED, 100 + n])
    with Client(address, timeout=60) as client:
        while time.monotonic() < deadline:
            k = int(rng.integers(1, 51))
            ef = int(rng.choice([0, int(rng.integers(1, 300))]))
            if rng.random() < 0.2:
                i = int(rng.integers(len(base)))
                query = base[i]
                t0 = time.monotonic()
                hits = client.search(COLLECTION, id=f"base-{i}", k=k, ef=ef)
            else:
                query = unit(rng.normal(size=DIM).astype(np.float32))
                t0 = time.monotonic()
                hits = client.search(COLLECTION, vector=query, k=k, ef=ef)
            t1 = time.monotonic()
            assert len(hits) == k, f"{len(hits)} hits for k={k}"
            assert len({h.id for h in hits}) == k, f"repeated ids: {[h.id for h in hits]}"
            scores = [h.score for h in hits]
            assert scores == sorted(scores, reverse=True), scores
            searches.append(Search(t0, t1, query, [(h.id, h.score, int(h.metadata["v"]))
                                                   for h in hits]))


def run_threads(targets: list[Callable[[], None]]) -> list[BaseException]:
    """Run each target in its own thread; returns the exceptions they raised."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DURATION_S + 120)
        assert not t.is_alive(), "a client thread hung"
    return errors


@pytest.mark.timeout(240)
def test_writers_and_searchers_together(server: ServerProcess) -> None:
    rng = np.random.default_rng(SEED)
    base = unit(rng.normal(size=(PRELOAD, DIM)).astype(np.float32))
    history = History()
    with Client(server.address) as client:
        ids = [f"base-{i}" for i in range(PRELOAD)]
        t0 = time.monotonic()
        client.upsert(COLLECTION, ids=ids, vectors=base,
                      metadata=[{"base": i, "v": 0} for i in range(PRELOAD)])
        history.record(ids, [Op(t0, time.monotonic(), 0, v) for v in base])

    stats = [{"upserts": 0, "deletes": 0} for _ in range(WRITERS)]
    searches: list[list[Search]] = [[] for _ in range(SEARCHERS)]
    deadline = time.monotonic() + DURATION_S
    started = time.monotonic()
    errors = run_threads(
        [lambda n=n: writer(server.address, n, history, deadline, stats[n])
         for n in range(WRITERS)]
        + [lambda n=n: searcher(server.address, n, base, deadline, searches[n])
           for n in range(SEARCHERS)])
    elapsed = time.monotonic() - started
    assert not errors, f"{len(errors)} client threads failed: " + "; ".join(
        repr(e)[:400] for e in errors[:3])

    assert server.proc is not None and server.proc.poll() is None, server.log()
    with Client(server.address) as client:
        # The truth: every id's last call says whether it exists and which version.
        last = {id_: ops[-1] for id_, ops in history.ops.items()}
        alive = sorted(i for i, op in last.items() if op.version is not None)
        assert client.count(COLLECTION) == len(alive)
        stored = {r.id: r for r in client.get(COLLECTION, alive, include_vectors=True)}
        assert stored.keys() == set(alive)
        for id_ in alive:
            assert int(stored[id_].metadata["v"]) == last[id_].version
            np.testing.assert_allclose(stored[id_].vector, last[id_].vector, atol=1e-6)
        gone = [i for i, op in last.items() if op.version is None]
        assert client.get(COLLECTION, gone) == []
        assert client.info().dim == DIM

    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    all_searches = [s for per in searches for s in per]
    problems = [p for s in all_searches for id_, score, version in s.hits
                if (p := history.problem(id_, version, score, s)) is not None]
    assert not problems, f"{len(problems)} impossible hits; first: {problems[:5]}"
    assert "Traceback" not in server.log(), server.log()

    upserts = sum(s["upserts"] for s in stats)
    deletes = sum(s["deletes"] for s in stats)
    print(f"\n{elapsed:.1f}s: {len(all_searches) / elapsed:.0f} searches/s, "
          f"{(upserts + deletes) / elapsed:.0f} writes/s ({upserts} upserts, {deletes} deletes), "
          f"{len(alive)} items at the end")
