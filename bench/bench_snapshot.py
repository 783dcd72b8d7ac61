"""Snapshot stalls: does hnswlib's save_index hold the GIL, and what a snapshot does to p99.

1. GIL probe: a thread that sleeps 1 ms in a loop records its longest gap while
   `save_index` writes a graph of N x 512 in the main thread; if the save held the GIL for
   its whole run, the gap is about the save's duration.
2. Latency: one thread searches (k 10, ef 64) and one upserts single items, each with a 2 ms
   pause between calls, for a fixed time in three phases: no snapshot; snapshots back to back
   saved in-process (the old way: under the write lock, GIL held); snapshots back to back
   saved by a forked child (the new default). Target (issue 11): p99 during snapshots at most
   2x the p99 without.
3. Restart: opening the collection from its snapshot.

Run: .venv/bin/python bench/bench_snapshot.py                  (200k items, ~6 minutes)
     .venv/bin/python bench/bench_snapshot.py --items 20000    (a smoke run)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import load, machine, ms, progress, section, table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))

from clipsearch_server.launch import with_huge_pages  # noqa: E402
from clipsearch_server.stores.base import NewItem  # noqa: E402
from clipsearch_server.stores.local import Collection  # noqa: E402
from clipsearch_server.stores.local.hnsw import HnswIndex  # noqa: E402

DIM = 512
PAUSE_S = 0.002


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Ticker:
    """A thread sleeping 1 ms at a time; `gap()` is its longest wake-up gap since reset."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._longest = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            self._longest = max(self._longest, now - last)
            last = now

    def reset(self) -> None:
        self._longest = 0.0

    def gap_ms(self) -> float:
        return self._longest * 1e3

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def build(folder: Path, items: int, ef_construction: int) -> Collection:
    collection = Collection.create(folder, DIM, "bench", 16, ef_construction)
    rng = np.random.default_rng(0)
    step = 10_000
    for start in range(0, items, step):
        vectors = unit(rng, min(step, items - start))
        collection.upsert([NewItem(f"v{start + i}", v, {}) for i, v in enumerate(vectors)])
        progress(f"built {start + len(vectors):,} of {items:,}")
    return collection


def gil_probe(collection: Collection, folder: Path) -> list[list[object]]:
    graph = collection.index._graph
    ticker = Ticker()
    rows = []
    time.sleep(0.05)
    ticker.reset()
    time.sleep(0.5)
    rows.append(["idle (0.5 s)", float("nan"), ticker.gap_ms()])
    for attempt in range(2):
        ticker.reset()
        started = time.perf_counter()
        graph.save_index(str(folder / "probe.hnsw"))
        took = time.perf_counter() - started
        rows.append([f"save_index in this process (#{attempt + 1})", took * 1e3, ticker.gap_ms()])
    HnswIndex.save_in_child = True
    for attempt in range(2):
        ticker.reset()
        started = time.perf_counter()
        with collection.index.lock.write():
            pending = collection.index.begin_save()
        forked = time.perf_counter() - started
        collection.index.finish_save(pending)
        took = time.perf_counter() - started
        rows.append([f"forked child saves, parent waits + hashes (#{attempt + 1})", took * 1e3,
                     ticker.gap_ms()])
        rows.append([f"  of which fork() under the write lock (#{attempt + 1})", forked * 1e3,
                     float("nan")])
    ticker.stop()
    (folder / "probe.hnsw").unlink(missing_ok=True)
    return rows


def latency_phase(collection: Collection, seconds: float, snapshots: str | None
                  ) -> list[object]:
    """Search and upsert latencies for `seconds`, with snapshots back to back if asked."""
    stop = threading.Event()
    search_s: list[float] = []
    upsert_s: list[float] = []
    saves: list[float] = []
    rng = np.random.default_rng(1)
    queries = unit(rng, 500)
    news = unit(rng, 5000)

    def searcher() -> None:
        i = 0
        while not stop.is_set():
            started = time.perf_counter()
            collection.search(queries[i % len(queries)], 10, 64)
            search_s.append(time.perf_counter() - started)
            i += 1
            time.sleep(PAUSE_S)

    def upserter() -> None:
        i = 0
        while not stop.is_set():
            started = time.perf_counter()
            collection.upsert([NewItem(f"new-{snapshots}-{i}", news[i % len(news)], {})])
            upsert_s.append(time.perf_counter() - started)
            i += 1
            time.sleep(PAUSE_S)

    def snapshotter() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            collection.snapshot(force=True)
            saves.append(time.perf_counter() - started)

    HnswIndex.save_in_child = snapshots == "forked"
    threads = [threading.Thread(target=searcher), threading.Thread(target=upserter)]
    if snapshots:
        threads.append(threading.Thread(target=snapshotter))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    s50, s99 = ms(search_s)
    u50, u99 = ms(upsert_s)
    return [snapshots or "none", len(saves), float(np.mean(saves)) if saves else float("nan"),
            len(search_s), s50, s99, max(search_s) * 1e3, len(upsert_s), u50, u99,
            max(upsert_s) * 1e3]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--ef-construction", type=int, default=40,
                        help="graph build quality; the save's cost depends only on the size")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    with_huge_pages()  # as the server runs (launch.py): may re-execute this command once

    print(f"Machine: {machine()}")
    print(f"Collection: {args.items:,} x {DIM}, M 16, ef_construction {args.ef_construction}; "
          f"{load()} at start; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    with tempfile.TemporaryDirectory(dir=REPO / "bench") as tmp:
        folder = Path(tmp) / "snap"
        collection = build(folder, args.items, args.ef_construction)
        progress("GIL probe")
        section("1. Does save_index hold the GIL? (a thread ticking every 1 ms)", table(
            ["what runs", "took ms", "longest tick gap ms"], gil_probe(collection, Path(tmp))))
        rows = []
        for mode in (None, "in-process", "forked", None):
            progress(f"latency phase, snapshots: {mode or 'none'}")
            rows.append(latency_phase(collection, args.seconds, mode))
        base_search = min(rows[0][5], rows[-1][5])
        base_upsert = min(rows[0][9], rows[-1][9])
        for row in rows:
            row.append(f"{row[5] / base_search:.2f} / {row[9] / base_upsert:.2f}")
        section(f"2. Latency with snapshots back to back, {args.seconds:g} s per phase", table(
            ["snapshots", "saves", "mean save s", "searches", "p50 ms", "p99 ms", "max ms",
             "upserts", "p50 ms", "p99 ms", "max ms", "p99 vs none (search / upsert)"], rows))
        collection.snapshot(force=True)
        collection.close()
        started = time.perf_counter()
        reopened = Collection.open(folder)
        took = time.perf_counter() - started
        section("3. Restart", table(["step", "seconds", "items"],
                                    [["open from snapshot", took, reopened.count()]]))
        reopened.close()
    print(f"\n{load()} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
