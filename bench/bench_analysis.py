"""Benchmark of the analysis RPCs on 100k vectors: duplicates, clusters, recommend vs search.

A real server (ViT-B-32 shape, random weights: only vectors are sent) holds 100,000 synthetic
512-d unit vectors around 1,000 centres, plus planted near-copies at cosine 0.98 whose pairs are
known, so the duplicate finder's recall is measured along with its time. Recommend's latency is
compared with a plain search on the same collection, in the same run.

    .venv/bin/python bench/bench_analysis.py            # 100k vectors, about 5 minutes on 2 cores
    .venv/bin/python bench/bench_analysis.py --quick    # 10k vectors, under a minute
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import load, machine, ms, progress, section, start_server, table

from clipsearch import Client

COLLECTION = "bench-analysis"


def dataset(n: int, dim: int, pairs: int, seed: int = 0
            ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """n unit vectors around 1,000 centres; the last `pairs` rows copy earlier rows at 0.98."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim))
    v = centres[rng.integers(0, 1000, n)] + 0.6 * rng.normal(size=(n, dim))
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    originals = rng.choice(n - pairs, pairs, replace=False)
    planted = []
    for j, i in enumerate(originals):
        u = rng.normal(size=dim)
        u -= (u @ v[i]) * v[i]
        u /= np.linalg.norm(u)
        v[n - pairs + j] = 0.98 * v[i] + np.sqrt(1 - 0.98**2) * u
        planted.append((int(i), n - pairs + j))
    return v.astype(np.float32), planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--pairs", type=int, default=1000, help="planted duplicate pairs")
    parser.add_argument("--queries", type=int, default=300, help="timed calls per query kind")
    parser.add_argument("--quick", action="store_true", help="10k vectors, 100 queries")
    args = parser.parse_args()
    if args.quick:
        args.n, args.pairs, args.queries = 10_000, 100, 100
    print(f"Machine: {machine()}\n{load()} at start")
    vectors, planted = dataset(args.n, 512, args.pairs)
    ids = [f"v{i:06d}" for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_server("ViT-B-32", Path(tmp) / "data")
        try:
            with Client(address, timeout=600) as client:
                progress(f"loading {args.n} vectors")
                started = time.perf_counter()
                for s in range(0, args.n, 2000):
                    client.upsert(COLLECTION, ids=ids[s:s + 2000], vectors=vectors[s:s + 2000])
                progress(f"loaded in {time.perf_counter() - started:.0f}s")
                run(client, vectors, ids, planted, args.queries)
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"\n{load()} at end")


def run(client: Client, vectors: np.ndarray, ids: list[str], planted: list[tuple[int, int]],
        queries: int) -> None:
    n = len(ids)
    rows = []
    expected = {frozenset((ids[a], ids[b])) for a, b in planted}
    for threshold, neighbours in ((0.95, 10), (0.95, 5), (0.9, 10)):
        started = time.perf_counter()
        groups = client.find_duplicates(COLLECTION, threshold=threshold, neighbors=neighbours,
                                        page_size=1000)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        client.find_duplicates(COLLECTION, threshold=threshold, neighbors=neighbours,
                               page_size=1000)
        warm = time.perf_counter() - started
        found = {frozenset(g.ids) for g in groups}
        rows.append([threshold, neighbours, cold, warm, len(groups),
                     len(found & expected) / len(expected), len(found - expected)])
    section(f"FindDuplicates, {n:,} vectors ({len(planted)} planted pairs at cosine 0.98)",
            table(["threshold", "neighbours", "first call s", "again (cached) s", "groups",
                   "planted pairs found", "other groups"], rows))

    rows = []
    for clusters in (10, 100):
        started = time.perf_counter()
        result = client.cluster(COLLECTION, clusters, top_n=5)
        rows.append([clusters, time.perf_counter() - started, max(result.sizes),
                     min(result.sizes)])
    started = time.perf_counter()
    client.cluster(COLLECTION, 10, metadata_key="cluster")
    rows.append(["10 + write metadata", time.perf_counter() - started, "", ""])
    section(f"Cluster (k-means, scikit-learn), {n:,} vectors",
            table(["clusters", "seconds", "largest", "smallest"], rows))

    rng = np.random.default_rng(1)
    picks = rng.integers(0, n, size=(queries + 20, 3))

    def timed(call: Callable[[np.ndarray], object]) -> list[float]:
        for p in picks[:20]:
            call(p)
        out = []
        for p in picks[20:]:
            started = time.perf_counter()
            call(p)
            out.append(time.perf_counter() - started)
        return out

    kinds = {
        "search by vector": lambda p: client.search(COLLECTION, vector=vectors[p[0]], k=10),
        "search by id": lambda p: client.search(COLLECTION, id=ids[p[0]], k=10),
        "recommend average, 1+ 1- ids": lambda p: client.recommend(
            COLLECTION, [ids[p[0]]], [ids[p[1]]], k=10),
        "recommend average, 2+ 1- ids": lambda p: client.recommend(
            COLLECTION, [ids[p[0]], ids[p[2]]], [ids[p[1]]], k=10),
        "recommend best score, 2+ 1- ids": lambda p: client.recommend(
            COLLECTION, [ids[p[0]], ids[p[2]]], [ids[p[1]]], k=10, strategy="best_score"),
    }
    results = {name: ms(timed(call)) for name, call in kinds.items()}
    base = results["search by vector"][0]
    section(f"Recommend against search, {n:,} vectors, k=10, one client, {queries} calls each",
            table(["call", "p50 ms", "p99 ms", "p50 / search p50"],
                  [[name, p50, p99, p50 / base] for name, (p50, p99) in results.items()]))


if __name__ == "__main__":
    main()
