"""Index benchmarks (issue 3): recall and speed of search, filtered search, restart and ingest.

One collection of synthetic clustered 512-d unit vectors is built through the Collection API
in a temporary folder and reused by every part, so the numbers include our locking and the
SQLite lookups. Raw hnswlib `knn_query` on the very same graph is the baseline.

    .venv/bin/python bench/bench_index.py           # 100k vectors, 5 to 10 minutes on 2 cores
    .venv/bin/python bench/bench_index.py --quick   # 5k vectors, a few seconds

Tables go to stdout (markdown), progress to stderr.

The data is a model, not CLIP: image-like vectors are Gaussian clusters around centres that
share one "image cone" direction; text-like queries are a concept centre shifted by one fixed
"modality gap" direction, scaled so they have a chosen cosine (0.3) to their cluster's items.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import load, machine, ms, progress, section, table

from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch_server.config import Settings
from clipsearch_server.stores.base import NewItem
from clipsearch_server.stores.local import STORE_FILE, Collection, Collections
from clipsearch_server.stores.local.collection import MAX_BOOSTED_EF
from clipsearch_server.stores.local.hnsw import MANIFEST
from clipsearch_server.stores.local.sql_filters import SqlFilter, compile_filter
from clipsearch_server.stores.local.sqlite import Store

DIM = 512
K = 10
BUCKETS = 1000  # metadata {"bucket": row % BUCKETS}: a range on it picks any selectivity
CONE = 0.8  # weight of the direction all image-like vectors share (unrelated pairs: cos ~0.3)
TEXT_SPREAD = 0.3  # noise of a text-like query around its concept centre (relative to sigma=1)
TARGET_RECALL = 0.98
NAME = "bench"


# --- synthetic data -----------------------------------------------------------------------
def unit(a: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32."""
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class Synthetic:
    """Clustered image-like unit vectors and what generated them."""

    vectors: np.ndarray  # (n, DIM) unit rows; row i is item "img-i" with label i
    cluster: np.ndarray  # (n,) cluster of each row
    centres: np.ndarray  # (clusters, DIM) unit centres
    cluster_means: np.ndarray  # (clusters, DIM) mean of each cluster's items
    gap: np.ndarray  # (DIM,) unit "modality gap" direction, orthogonal to the image cone
    sigma: float


def noise(rng: np.random.Generator, rows: int) -> np.ndarray:
    """Isotropic Gaussian noise with expected norm about 1 per row."""
    return (rng.standard_normal((rows, DIM)) / math.sqrt(DIM)).astype(np.float32)


def make_data(n: int, clusters: int, sigma: float, rng: np.random.Generator) -> Synthetic:
    """n unit vectors in equal clusters: normalise(centre + sigma * noise)."""
    image_dir = unit(rng.standard_normal(DIM))
    centres = unit(CONE * image_dir + noise(rng, clusters))
    cluster = rng.permutation(np.arange(n) % clusters)
    vectors = unit(centres[cluster] + sigma * noise(rng, n))
    order = np.argsort(cluster, kind="stable")
    starts = np.searchsorted(cluster[order], np.arange(clusters))
    sums = np.add.reduceat(vectors[order].astype(np.float64), starts, axis=0)
    cluster_means = (sums / np.bincount(cluster, minlength=clusters)[:, None]).astype(np.float32)
    text_dir = rng.standard_normal(DIM)
    text_dir -= (text_dir @ image_dir) * image_dir
    return Synthetic(vectors, cluster, centres, cluster_means, unit(text_dir), sigma)


def image_queries(data: Synthetic, count: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Fresh draws from the items' own distribution (not in the collection); and clusters."""
    targets = rng.integers(0, len(data.centres), count)
    return unit(data.centres[targets] + data.sigma * noise(rng, count)), targets


def text_queries(data: Synthetic, count: int, cosine: float, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """normalise(centre + small noise + magnitude * gap), the magnitude chosen so the mean
    cosine to the target cluster's items is `cosine`; returns queries, clusters, magnitude."""
    targets = rng.integers(0, len(data.centres), count)
    base = data.centres[targets] + TEXT_SPREAD * noise(rng, count)
    means = data.cluster_means[targets]

    def mean_cos(magnitude: float) -> float:
        return float(np.mean(np.sum(unit(base + magnitude * data.gap) * means, axis=1)))

    lo, hi = 0.0, 1.0
    while mean_cos(hi) > cosine:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_cos(mid) > cosine else (lo, mid)
    return unit(base + hi * data.gap), targets, hi


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows by inner product, best first; and every query's full score median."""
    top = np.empty((len(queries), k), np.int64)
    medians = np.empty(len(queries), np.float32)
    for s in range(0, len(queries), 256):
        scores = queries[s:s + 256] @ vectors.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
        top[s:s + 256] = np.take_along_axis(part, order, axis=1)
        medians[s:s + 256] = np.median(scores, axis=1)
    return top, medians


def recall(found: list[np.ndarray] | np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top k that was found."""
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(f, t)) / k for f, t in zip(found, truth,
                                                                      strict=True)]))


def rows_of(hits: list) -> np.ndarray:
    return np.array([int(h.id[4:]) for h in hits], dtype=np.int64)


def bucket_filter(below: int) -> SqlFilter:
    """Items whose metadata bucket is below `below`: a fraction below/BUCKETS of all."""
    return compile_filter(pb.Filter(field=pb.FieldFilter(key="bucket",
                                                         range=pb.NumberRange(lt=below))))


@contextlib.contextmanager
def timing(obj: object, method: str, total: list[float]) -> Iterator[None]:
    """Add the seconds spent in obj.method to total[0] while inside the block."""
    original = getattr(obj, method)

    def timed(*args: object, **kwargs: object) -> object:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - started

    setattr(obj, method, timed)
    try:
        yield
    finally:
        delattr(obj, method)


@dataclass
class Timing:
    """Per-call wall and CPU seconds of a loop, and its results."""

    results: list[object]
    wall: np.ndarray  # seconds per call
    cpu: np.ndarray  # CPU seconds of this thread per call: what other work cannot inflate
    elapsed: float  # wall seconds of the whole loop

    @property
    def rate(self) -> float:
        return len(self.wall) / self.elapsed

    @property
    def cpu_ms(self) -> float:
        """Mean CPU milliseconds per call."""
        return float(self.cpu.mean() * 1e3)

    @property
    def cpu_p50(self) -> float:
        return float(np.median(self.cpu) * 1e3)


def wall_p50(run: Timing) -> float:
    """Median wall milliseconds per call."""
    return ms(run.wall)[0]


def timed_loop(fn: Callable[[int], object], count: int, warmup: int = 10,
               budget_s: float = math.inf, min_count: int = 5) -> Timing:
    """Call fn(i) for i in range(count), stopping early once past budget_s (after min_count)."""
    for i in range(min(warmup, count)):
        fn(i)
    results, wall, cpu = [], [], []
    started = time.perf_counter()
    for i in range(count):
        t, c = time.perf_counter(), time.thread_time()
        results.append(fn(i))
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - t)
        if i + 1 >= min_count and time.perf_counter() - started > budget_s:
            break
    return Timing(results, np.array(wall), np.array(cpu), time.perf_counter() - started)


def best_of(passes: int, fn: Callable[[int], object], count: int) -> Timing:
    """timed_loop repeated; the pass with the highest rate (other work on the machine only
    ever slows a pass down)."""
    runs = [timed_loop(fn, count, warmup=10 if p == 0 else 0) for p in range(passes)]
    return max(runs, key=lambda run: run.rate)


# --- the parts ----------------------------------------------------------------------------
def ingest(col: Collection, data: Synthetic, batch: int) -> list[list[object]]:
    """Part 5: upsert every vector in batches; rows for the ingest table."""
    store_s, graph_s = [0.0], [0.0]
    n = len(data.vectors)
    lat = []
    with timing(col.store, "upsert", store_s), timing(col.index, "add", graph_s):
        started, cpu = time.perf_counter(), time.process_time()
        for s in range(0, n, batch):
            items = [NewItem(f"img-{i}", data.vectors[i],
                             {"bucket": i % BUCKETS, "cluster": int(data.cluster[i])})
                     for i in range(s, min(s + batch, n))]
            t = time.perf_counter()
            col.upsert(items)
            lat.append(time.perf_counter() - t)
            if (s // batch) % 10 == 9:
                progress(f"ingested {s + batch:,} / {n:,}")
        total, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert col.count() == n
    first, last = col.store.get_by_labels([0, n - 1]).values()
    assert (first.id, last.id) == ("img-0", f"img-{n - 1}"), "labels are not rows"
    p50, p99 = ms(lat)
    return [[n, batch, total, n / total, p50, p99, store_s[0], graph_s[0], cpu]]


def ef_sweep(col: Collection, queries: np.ndarray, truth: np.ndarray, efs: list[int],
             passes: int) -> tuple[list[list[object]], dict[int, float], bool, Timing]:
    """Collection.search and raw hnswlib at each ef: table rows, recall by ef, same ids?, and
    the timing of the store lookup of the hits' records alone."""
    graph = col.index._graph  # the very graph the collection searches
    rows, by_ef, same = [], {}, True
    for ef in efs:
        ours = best_of(passes, lambda i, ef=ef: col.search(queries[i], K, ef), len(queries))
        found = [rows_of(h) for h in ours.results]
        graph.set_ef(max(ef, K))
        raw = best_of(
            passes, lambda i: graph.knn_query(queries[i:i + 1], k=K, num_threads=1)[0][0],
            len(queries))
        batch_qps = 0.0
        for _ in range(passes):
            started = time.perf_counter()
            graph.knn_query(queries, k=K, num_threads=-1)
            batch_qps = max(batch_qps, len(queries) / (time.perf_counter() - started))
        graph.set_ef(col.index._ef)  # give the wrapper back the ef it believes is set
        if ef == efs[0]:  # the record lookup every search does, alone
            hit_labels = [r.tolist() for r in raw.results]
            lookups = best_of(passes, lambda i, hl=hit_labels: col.store.get_by_labels(hl[i]),
                              len(queries))
            progress(f"store.get_by_labels({K} labels): {lookups.cpu_ms:.3f} CPU ms")
        same &= all(np.array_equal(f, r) for f, r in zip(found, raw.results, strict=True))
        by_ef[ef] = recall(found, truth)
        rows.append([ef, by_ef[ef], ours.rate, ours.cpu_ms, *ms(ours.wall), raw.rate,
                     raw.cpu_ms, batch_qps])
        progress(f"ef {ef}: recall {by_ef[ef]:.4f}, {ours.rate:.0f} q/s, "
                 f"{ours.cpu_ms:.2f} CPU ms/query")
    return rows, by_ef, same, lookups


def needed_ef(by_ef: dict[int, float]) -> str:
    reached = [ef for ef, r in sorted(by_ef.items()) if r >= TARGET_RECALL]
    return str(reached[0]) if reached else f"> {max(by_ef)}"


def metadata_only_copy(col: Collection) -> Store:
    """What-if: a store whose items table holds labels and metadata but no vector blobs (the
    same WHERE then scans a table ~50x smaller), beside the collection's folder."""
    path = col.folder.parent / "what-if-metadata-only.sqlite3"
    slim = Store(path)
    slim._db.execute("ATTACH DATABASE ? AS src", (str(col.folder / STORE_FILE),))
    slim._db.execute("CREATE TABLE slim (label INTEGER PRIMARY KEY, metadata TEXT NOT NULL)")
    slim._db.execute("INSERT INTO slim SELECT label, metadata FROM src.items")
    slim._db.execute("DETACH DATABASE src")
    slim._db.execute("DROP TABLE items")
    slim._db.execute("ALTER TABLE slim RENAME TO items")
    return slim


@dataclass
class FilterRow:
    """One selectivity's measurements (ms; the paths without the SQLite scan)."""

    selectivity: float
    matching: int
    scan: Timing
    exact: Timing
    exact_recall: float
    graph: Timing
    graph_ef: int
    graph_recall: float
    fallbacks: int
    mirror: Timing
    slim_scan: Timing

    def cells(self) -> list[object]:
        return [f"{self.selectivity * 100:g} %", self.matching,
                *ms(self.scan.wall), self.scan.cpu_p50, ms(self.slim_scan.wall)[0],
                *ms(self.exact.wall), self.exact.cpu_p50,
                *ms(self.graph.wall), self.graph.cpu_p50, self.graph_ef, self.graph_recall,
                ms(self.mirror.wall)[0], f"{len(self.exact.wall)}/{len(self.graph.wall)}"]


def filtered(col: Collection, data: Synthetic, queries: np.ndarray, selectivities: list[float],
             ef: int, budget_s: float) -> list[FilterRow]:
    """Part 3: the SQLite filter scan alone, then the exact and graph paths without it (the
    scan's result is handed back from a cache), at each selectivity."""
    n = len(data.vectors)
    bucket = np.arange(n) % BUCKETS
    fallbacks = [0]
    original_search = col.index.search

    def counting_search(*args: object, **kwargs: object) -> object:
        try:
            return original_search(*args, **kwargs)
        except RuntimeError:
            fallbacks[0] += 1
            raise

    def mirror_exact(q: np.ndarray, labels: np.ndarray) -> object:
        """What-if: the exact path with vectors from an in-memory array, not get_items."""
        scores = data.vectors[labels] @ q
        kk = min(K, len(labels))
        top = np.argpartition(-scores, kk - 1)[:kk] if kk < len(scores) else np.arange(kk)
        top = top[np.argsort(-scores[top])]
        return col.store.get_by_labels(labels[top].tolist())

    slim = metadata_only_copy(col)
    rows = []
    saved = col.exact_search_max
    col.index.search = counting_search  # type: ignore[method-assign]
    try:
        for sel in selectivities:
            below = max(1, round(sel * BUCKETS))
            where = bucket_filter(below)
            subset = np.flatnonzero(bucket < below)
            labels = col.store.labels_matching(where)
            assert np.array_equal(labels, subset), "labels are not rows"
            top, _ = exact_top(data.vectors[subset], queries, min(K, len(subset)))
            truth = subset[top]
            scan = timed_loop(lambda i, w=where: col.store.labels_matching(w),
                              min(5, len(queries)), warmup=1)
            slim_scan = timed_loop(lambda i, w=where: slim.labels_matching(w),
                                   min(5, len(queries)), warmup=1)
            col.store.labels_matching = lambda _where, cached=labels: cached
            paths: dict[str, tuple[Timing, float, int]] = {}
            try:
                for path, limit in (("exact", 10**12), ("graph", 0)):
                    col.exact_search_max = limit
                    fallbacks[0] = 0
                    run = timed_loop(lambda i, w=where: col.search(queries[i], K, ef, w),
                                     len(queries), warmup=2, budget_s=budget_s)
                    found = [rows_of(h) for h in run.results]
                    paths[path] = (run, recall(found, truth[:len(found)]), fallbacks[0])
            finally:
                del col.store.labels_matching
            mirror = timed_loop(lambda i, lb=labels: mirror_exact(queries[i], lb),
                                len(queries), warmup=2, budget_s=budget_s)
            (ex, ex_recall, _), (gr, gr_recall, gr_fallbacks) = paths["exact"], paths["graph"]
            rows.append(FilterRow(
                sel, len(subset), scan, ex, ex_recall, gr,
                min(int(max(ef, K) * (n / len(subset))), MAX_BOOSTED_EF), gr_recall,
                gr_fallbacks, mirror, slim_scan))
            progress(f"filter {sel:.3%}: scan {ms(scan.wall)[0]:.1f} ms, exact "
                     f"{ms(ex.wall)[0]:.1f} ms ({ex.cpu_p50:.1f} CPU), graph "
                     f"{ms(gr.wall)[0]:.1f} ms ({gr.cpu_p50:.1f} CPU)")
    finally:
        col.exact_search_max = saved
        del col.index.search
        slim.close()
    return rows


def switch_point(rows: list[FilterRow], exact: Callable[[FilterRow], float],
                 graph: Callable[[FilterRow], float]) -> str:
    """The smallest measured matching count from which the graph path wins at every larger one
    (graph(row) below exact(row), and recall >= target)."""
    by_size = sorted(rows, key=lambda r: r.matching)
    wins = [graph(r) < exact(r) and r.graph_recall >= TARGET_RECALL for r in by_size]
    if not wins[-1]:
        return "the exact path wins even at the largest matching count measured"
    first = len(by_size)
    while first > 0 and wins[first - 1]:
        first -= 1
    if first == 0:
        return "the graph path wins at every matching count measured"
    return (f"exact wins up to {by_size[first - 1].matching:,} matching items, the graph "
            f"from {by_size[first].matching:,}")


def restart(collections: Collections, data_dir: Path, queries: np.ndarray, truth: np.ndarray,
            ef: int, settings: Settings) -> list[list[object]]:
    """Part 4: reopen from a snapshot, then from the store alone (manifest removed)."""
    col = collections.get(NAME)
    before = [rows_of(col.search(q, K, ef)) for q in queries[:100]]
    started, cpu = time.perf_counter(), time.process_time()
    col.snapshot(force=True)
    snap_s, snap_cpu = time.perf_counter() - started, time.process_time() - cpu
    folder = col.folder
    snap_mb = sum(f.stat().st_size for f in folder.glob("index-*.hnsw")) / 2**20
    collections.close_all()

    def reopen() -> tuple[Collections, float, float]:
        started, cpu = time.perf_counter(), time.process_time()
        again = Collections(data_dir, DIM, "bench", settings.hnsw_m,
                            settings.hnsw_ef_construction)
        again.open_all()
        return again, time.perf_counter() - started, time.process_time() - cpu

    rows: list[list[object]] = [["save snapshot (Collection.snapshot)", snap_s, snap_cpu,
                                 f"{snap_mb:.0f} MiB file"]]
    again, seconds, cpu_s = reopen()
    col = again.get(NAME)
    after = [rows_of(col.search(q, K, ef)) for q in queries[:100]]
    same = all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    rows.append(["open from snapshot", seconds, cpu_s,
                 f"{col.count():,} items, same results as before: {'yes' if same else 'NO'}"])
    again.close_all()

    store = Store(folder / STORE_FILE)
    started, cpu = time.perf_counter(), time.process_time()
    read = sum(len(labels) for labels, _ in store.changes_after(0))
    rows.append(["  of a rebuild: reading the store alone", time.perf_counter() - started,
                 time.process_time() - cpu, f"{read:,} vectors"])
    store.close()

    (folder / MANIFEST).unlink()
    progress("rebuilding the graph from the store")
    again, seconds, cpu_s = reopen()
    col = again.get(NAME)
    found = [rows_of(col.search(q, K, ef)) for q in queries]
    rows.append(["open from store alone (rebuild)", seconds, cpu_s,
                 f"{col.count():,} items, recall@{K} at ef {ef} {recall(found, truth):.4f}"])
    again.close_all()
    return rows


# --- main ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5k vectors, few queries: seconds")
    p.add_argument("--n", type=int, default=100_000, help="vectors in the collection")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--sigma", type=float, default=0.6,
                   help="cluster spread: item-to-centre cosine is 1/sqrt(1+sigma^2)")
    p.add_argument("--text-cos", type=float, default=0.3,
                   help="mean cosine of a text-like query to its target cluster's items")
    p.add_argument("--queries", type=int, default=1000, help="unfiltered queries of each kind")
    p.add_argument("--passes", type=int, default=2, help="timing passes; the best is kept")
    p.add_argument("--filtered-queries", type=int, default=30,
                   help="queries per selectivity and path (fewer where a cell runs long)")
    p.add_argument("--cell-budget", type=float, default=4.0,
                   help="seconds after which a filtered-search cell stops (after 5 queries)")
    p.add_argument("--efs", default="16,24,32,48,64,96,128,192,256,512")
    p.add_argument("--selectivities", default="0.001,0.01,0.02,0.05,0.1,0.2,0.4,0.6")
    p.add_argument("--batch", type=int, default=1000, help="upsert batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, help="work folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.clusters, args.queries, args.filtered_queries = 5000, 50, 100, 5
        args.efs, args.cell_budget = "16,32,64,128,256", 1.0
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings()
    ef0 = settings.default_ef
    ef_text = getattr(settings, "default_ef_text", ef0)  # the default for text queries
    efs = sorted({int(e) for e in args.efs.split(",")} | {ef0, ef_text})
    selectivities = [float(s) for s in args.selectivities.split(",")]
    rng = np.random.default_rng(args.seed)
    print(f"Machine: {machine()}")
    print(f"Command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"At start: {load()}")
    print(f"Collection: {args.n:,} x {DIM}-d, M={settings.hnsw_m}, "
          f"ef_construction={settings.hnsw_ef_construction}, default ef={ef0} "
          f"(text queries {ef_text}), k={K}")

    progress("generating data")
    data = make_data(args.n, args.clusters, args.sigma, rng)
    img_q, _ = image_queries(data, args.queries, rng)
    txt_q, txt_targets, magnitude = text_queries(data, args.queries, args.text_cos, rng)
    img_truth, img_median = exact_top(data.vectors, img_q, K)
    txt_truth, txt_median = exact_top(data.vectors, txt_q, K)

    def cos_stats(q: np.ndarray, truth: np.ndarray, median: np.ndarray) -> list[float]:
        top = np.sum(data.vectors[truth] * q[:, None, :], axis=2)
        own = np.sum(q * data.cluster_means[data.cluster[truth[:, 0]]], axis=1)
        return [float(top[:, 0].mean()), float(top[:, -1].mean()), float(own.mean()),
                float(median.mean())]

    in_target = float(np.mean(data.cluster[txt_truth] == txt_targets[:, None]))
    data_rows = [["image-like", *cos_stats(img_q, img_truth, img_median)],
                 ["text-like", *cos_stats(txt_q, txt_truth, txt_median)]]

    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        collections = Collections(work, DIM, "bench", settings.hnsw_m,
                                  settings.hnsw_ef_construction)
        collections.open_all()
        col = collections.create(NAME)
        progress(f"ingesting {args.n:,} vectors into {work}")
        ingest_rows = ingest(col, data, args.batch)

        section("Data (synthetic; cosines averaged over the queries)", table(
            ["queries", "cos to 1st", "cos to 10th", "mean cos to top-1's cluster",
             "median cos to all items"], data_rows)
            + f"\n\n{args.clusters:,} clusters, sigma {args.sigma}; text-like queries: "
              f"gap magnitude {magnitude:.2f}, {in_target:.1%} of their true top {K} lie in "
              "their target cluster.")

        progress("part 1/2: ef sweep, image-like queries")
        headers = ["ef", f"recall@{K}", "Collection q/s", "CPU ms/q", "p50 ms", "p99 ms",
                   "hnswlib q/s", "CPU ms/q", "hnswlib batch q/s"]
        timing_note = (f"Speeds: the best of {args.passes} passes over the queries (other work "
                       "on the machine only slows a pass down); CPU ms/q = this thread's CPU "
                       "time per query, which other work on the machine cannot inflate.")
        img_rows, img_by_ef, img_same, lookups = ef_sweep(col, img_q, img_truth, efs, args.passes)
        section(f"1. Image-like queries ({args.queries:,}): recall@{K} vs exact, speed", table(
            headers, img_rows)
            + "\n\nCollection = Collection.search, one query at a time (lock, ef phase, SQLite "
              "record lookups). hnswlib = knn_query on the same graph, one query per call, "
              "1 thread; batch = all queries in one call, all cores. Same ids from both: "
              f"{'yes' if img_same else 'NO'}. {timing_note} Of Collection's CPU time, "
              f"store.get_by_labels of the {K} hits alone takes {lookups.cpu_ms:.3f} ms "
              f"(p50 {ms(lookups.wall)[0]:.3f} ms wall).")

        progress("part 2: ef sweep, text-like queries")
        txt_rows, txt_by_ef, txt_same, _ = ef_sweep(col, txt_q, txt_truth, efs, args.passes)
        section(f"2. Text-like queries ({args.queries:,}, synthetic modality gap)", table(
            headers, txt_rows) + f"\n\nSame ids from both: {'yes' if txt_same else 'NO'}.")
        section(f"2b. Recall@{K} by ef, image-like vs text-like", table(
            ["ef", "image-like", "text-like"],
            [[ef, img_by_ef[ef], txt_by_ef[ef]] for ef in efs])
            + f"\n\nSmallest ef measured with recall@{K} >= {TARGET_RECALL}: image-like "
              f"{needed_ef(img_by_ef)}, text-like {needed_ef(txt_by_ef)} "
              f"(default ef {ef0}: image-like {img_by_ef[ef0]:.4f}, text-like "
              f"{txt_by_ef[ef0]:.4f}; the default for text queries, ef {ef_text}: text-like "
              f"{txt_by_ef[ef_text]:.4f}).")

        progress("part 3: filtered search")
        f_rows = filtered(col, data, img_q[:args.filtered_queries], selectivities, ef0,
                          args.cell_budget)
        exact_recall = min(r.exact_recall for r in f_rows)
        fallbacks = sum(r.fallbacks for r in f_rows)
        section(f"3. Filtered search, bucket < t (up to {args.filtered_queries} image-like "
                f"queries per cell, ef {ef0}, k {K}; ms)", table(
            ["selectivity", "matching", "scan p50", "p99", "CPU", "what-if scan", "exact p50",
             "p99", "CPU", "graph p50", "p99", "CPU", "graph ef", "graph recall",
             "what-if exact", "queries"], [r.cells() for r in f_rows])
            + "\n\nscan = store.labels_matching(where) alone, the SQLite filter scan that every "
              "filtered search pays on top of its path. exact / graph = Collection.search with "
              "exact_search_max huge / 0, the scan's result served from a cache so only the "
              "path is timed. what-if scan = median wall ms of the same WHERE on a table of "
              "labels and metadata only, no vector blobs (not the current schema). CPU = median "
              "CPU ms of this thread per call. graph = hnswlib with "
              f"a filter callable, ef boosted by count/matching (capped at {MAX_BOOSTED_EF}). "
              f"exact recall@{K} was {exact_recall:.4f} at worst; graph searches that found "
              f"fewer than k and fell back to an exact rescoring: {fallbacks}. what-if exact = "
              "median wall ms of the exact path with vectors gathered from an in-memory numpy "
              "array instead of hnswlib get_items (not the current code). queries = exact/graph "
              f"queries timed (a cell stops after {args.cell_budget:g} s, at least 5 queries)."
              "\n\nSwitch point, current code (median CPU ms): "
              f"{switch_point(f_rows, lambda r: r.exact.cpu_p50, lambda r: r.graph.cpu_p50)}. "
              "With the what-if exact path (median wall ms): "
              f"{switch_point(f_rows, lambda r: wall_p50(r.mirror), lambda r: wall_p50(r.graph))}.")

        progress("part 4: restart")
        r_rows = restart(collections, work, img_q, img_truth, ef0, settings)
        section(f"4. Restart of the {args.n:,}-item collection", table(
            ["step", "seconds", "CPU s", "notes"], r_rows)
            + "\n\nCPU s = CPU seconds of the whole process (hnswlib inserts use all cores).")

        section(f"5. Ingest: Collection.upsert of {args.n:,} vectors", table(
            ["vectors", "batch", "seconds", "vectors/s", "batch p50 ms", "batch p99 ms",
             "in SQLite s", "in HNSW s", "CPU s"], ingest_rows)
            + "\n\nSQLite = store.upsert (WAL, synchronous=FULL, one transaction per batch); "
              "HNSW = index.add (hnswlib add_items, all cores); CPU s = CPU seconds of the whole "
              "process.")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nAt end: {load()}")
    progress("done")


if __name__ == "__main__":
    main()
