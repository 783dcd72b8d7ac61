"""Scaling out: the Milvus store against the embedded store, and the Ray Serve encoder hop.

Tables (`--tables store,ray`):
* store: ingest rate, search p50/p99 (no filter and a 5 % filter) and recall@10 on N
  synthetic 512-d unit vectors, through the same CollectionStore calls the service makes,
  for the local store (SQLite + hnswlib) and Milvus Lite, in the same run;
* ray: a short text query through the in-process encoder and through a Ray Serve deployment
  (one replica) in the same run (p50/p99, the hop's added latency), and image ingest from
  coco128 through a gRPC front with 1 and 2 encoder replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load, machine, ms, progress, section, table

from clipsearch_server.store import NewItem

DIM = 512


def synthetic(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, DIM))
    vectors = centres[rng.integers(0, 200, n)] + 0.6 * rng.normal(size=(n, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def store_table(n: int, queries: int, folder: Path) -> str:
    from clipsearch.filters import to_filter
    from clipsearch_server.stores.local import Collections
    from clipsearch_server.stores.milvus import MilvusCollections

    vectors = synthetic(n)
    rng = np.random.default_rng(1)
    buckets = rng.integers(0, 100, n)
    qs = synthetic(queries, seed=2)
    allowed = np.flatnonzero(buckets < 5)
    truth_all = np.argsort(-(qs @ vectors.T), axis=1)[:, :10]
    truth_f = allowed[np.argsort(-(qs @ vectors[allowed].T), axis=1)[:, :10]]
    rows = []
    for kind in ("local", "milvus"):
        progress(f"{kind}: ingest {n} vectors")
        registry = (Collections(folder / "local", DIM, "bench", 16, 200) if kind == "local"
                    else MilvusCollections(str(folder / "milvus.db"), "", DIM, "bench", 16, 200))
        registry.open_all()
        col = registry.create("bench")
        started = time.perf_counter()
        for s in range(0, n, 1000):
            col.upsert([NewItem(f"i{i}", vectors[i], {"bucket": int(buckets[i])})
                        for i in range(s, min(n, s + 1000))])
        ingest = n / (time.perf_counter() - started)
        started = time.perf_counter()
        registry.snapshot_all(force=True)  # local: save the graph; Milvus: flush and index
        settle = time.perf_counter() - started
        everything = col.compile_filter(None)
        few = col.compile_filter(to_filter({"bucket": {"$lt": 5}}))
        col.search(qs[0], 10, 64, everything)  # first search: Milvus builds its index
        for label, where, truth in (("no filter", everything, truth_all),
                                    ("5 % filter", few, truth_f)):
            times, recall = [], []
            for q, t in zip(qs, truth, strict=True):
                t0 = time.perf_counter()
                hits = col.search(q, 10, 64, where)
                times.append(time.perf_counter() - t0)
                recall.append(len({int(h.id[1:]) for h in hits} & set(t.tolist())) / 10)
            p50, p99 = ms(times)
            rows.append([kind, label, ingest, settle, p50, p99, float(np.mean(recall))])
        registry.close_all()
        progress(f"{kind}: done")
    by = {(r[0], r[1]): r for r in rows}
    for r in rows:
        r.append(r[4] / by[("local", r[1])][4])
    return table(["store", "search", "ingest/s", "snapshot/flush s", "p50 ms", "p99 ms",
                  "recall@10", "p50 vs local"], rows)


def ray_table(calls: int, images: int, folder: Path) -> str:
    from clipsearch_server.config import parse_settings
    from clipsearch_server.encoders.local import LocalEncoder
    from clipsearch_server.encoders.ray_deployment import deploy
    from clipsearch_server.encoders.ray_serve import RayEncoder

    ray_bin = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_bin, "start", "--head", "--num-cpus", "2", "--disable-usage-stats",
                    "--include-dashboard=false", f"--temp-dir={folder / 'ray'}"],
                   check=True, capture_output=True)
    model_args = ["--model", "ViT-B-32", "--random-weights", "--device", "cpu",
                  "--text-cache-size", "0"]
    try:
        rows = []
        import ray

        ray.init(address="auto", logging_level="ERROR")
        deploy(model_args, num_replicas=1, name="bench-encoder")
        settings = parse_settings([*model_args, "--encoder", "ray", "--ray-app", "bench-encoder"])
        local = LocalEncoder.start(parse_settings(model_args))
        remote = RayEncoder.connect(settings)

        async def measure(encoder) -> list[float]:
            out = []
            for i in range(calls):
                t0 = time.perf_counter()
                await encoder.embed_texts([f"a photo of a dog number {i}"])
                out.append(time.perf_counter() - t0)
            return out

        for label, encoder in (("in-process", local), ("Ray Serve, 1 replica", remote)):
            p50, p99 = ms(asyncio.run(measure(encoder))[5:])
            rows.append([label, p50, p99])
        rows.append(["added by the Ray hop", rows[1][1] - rows[0][1], rows[1][2] - rows[0][2]])
        local.close()
        remote.close()
        return table(["short text query, sequential", "p50 ms", "p99 ms"], rows)
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tables", default="store,ray")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="10k vectors, 100 queries, 50 calls")
    args = p.parse_args()
    if args.quick:
        args.n, args.queries, args.calls = 10_000, 100, 50
    print(machine())
    print(load())
    with tempfile.TemporaryDirectory() as tmp:
        if "store" in args.tables:
            section(f"Search on {args.n:,} vectors (512-d, k=10, ef 64), one caller",
                    store_table(args.n, args.queries, Path(tmp)))
        if "ray" in args.tables:
            section("The Ray Serve hop (ViT-B-32, random weights, CPU)",
                    ray_table(args.calls, args.images, Path(tmp)))
    print(load())


if __name__ == "__main__":
    main()
