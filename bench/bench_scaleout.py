"""Scaling out: the Milvus store against the embedded store, and the Ray Serve encoder hop.

Tables (`--tables store,ray`):
* store: ingest rate, search p50/p99 (no filter and a 5 % filter) and recall@10 on N
  synthetic 512-d unit vectors (bench_index.py's clustered model of image embeddings),
  through the same CollectionStore calls the service makes,
  for the local store (SQLite + hnswlib) and Milvus Lite, in the same run;
* ray: a short text query through the in-process encoder and through a Ray Serve deployment
  (one replica) in the same run (p50/p99, the hop's added latency), and image ingest from
  coco128 through a gRPC front with 1 and 2 encoder replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import image_queries, make_data
from common import load, machine, ms, progress, section, start_server, table

from clipsearch_server.stores.base import NewItem

DIM = 512


def store_table(n: int, queries: int, filtered_queries: int, folder: Path) -> str:
    from clipsearch.filters import to_filter
    from clipsearch_server.stores.local import Collections
    from clipsearch_server.stores.milvus import MilvusCollections

    # bench_index's model of CLIP image embeddings: 1000 clusters, item-to-centre cosine 0.86
    rng = np.random.default_rng(1)
    data = make_data(n, 1000, 0.6, rng)
    vectors = data.vectors
    buckets = rng.integers(0, 100, n)
    qs, _ = image_queries(data, queries, rng)
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
            count = queries if label == "no filter" else filtered_queries
            for q, t in zip(qs[:count], truth[:count], strict=True):
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


def ray_table(calls: int, images: int, folder: Path, model: str) -> tuple[str, str]:
    # The tests' helper: a head of our own on free ports, stopped by its temp dir alone
    # (`ray stop --force` would stop every Ray cluster on the machine).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from ray_cluster import local_ray_cluster

    with local_ray_cluster(folder / "ray") as cluster:
        return _ray_tables(cluster.address, calls, images, folder, model)


def _ray_tables(address: str, calls: int, images: int, folder: Path, model: str
                ) -> tuple[str, str]:
    import ray

    from clipsearch import Client
    from clipsearch_server.config import parse_settings
    from clipsearch_server.encoders.local import LocalEncoder
    from clipsearch_server.encoders.ray_deployment import deploy
    from clipsearch_server.encoders.ray_serve import RayEncoder

    model_args = ["--model", model, "--random-weights", "--device", "cpu",
                  "--text-cache-size", "0"]
    files = sorted((Path(__file__).resolve().parents[2] / "shared/data/coco128").rglob("*.jpg"))
    files = files[:images]
    ray.init(address=address, logging_level="ERROR")
    progress("deploying one replica")
    deploy(model_args, num_replicas=1, name="bench-1")
    local = LocalEncoder.start(parse_settings(model_args))
    remote = RayEncoder.connect(parse_settings(
        ["--encoder", "ray", "--ray-address", address, "--ray-app", "bench-1"]))

    async def measure(encoder) -> list[float]:
        out = []
        for i in range(calls):
            t0 = time.perf_counter()
            await encoder.embed_texts([f"a photo of a dog number {i}"])
            out.append(time.perf_counter() - t0)
        return out

    hop = []
    for label, encoder in (("in-process", local), ("Ray Serve, 1 replica", remote)):
        p50, p99 = ms(asyncio.run(measure(encoder))[5:])
        hop.append([label, p50, p99])
    hop.append(["added by the Ray hop", hop[1][1] - hop[0][1], hop[1][2] - hop[0][2]])
    local.close()
    remote.close()
    ray.shutdown()

    ingest = []
    for replicas in (0, 1, 2) if images else ():
        extra = ["--text-cache-size", "0"]
        if replicas:
            ray.init(address=address, logging_level="ERROR")
            from ray import serve

            for name in serve.status().applications:  # free the cores for this one
                serve.delete(name)
            progress(f"deploying {replicas} replicas")
            deploy(model_args, num_replicas=replicas, name=f"bench-{replicas}")
            ray.shutdown()
            extra += ["--encoder", "ray", "--ray-address", address,
                      "--ray-app", f"bench-{replicas}"]
        proc, addr = start_server(model, folder / f"ingest{replicas}" / "data", extra)
        try:
            with Client(addr) as client:
                client.upsert("warm", ids=[f.name for f in files[:8]], images=files[:8])
                t0 = time.perf_counter()
                client.upsert("coco", ids=[f.name for f in files], images=files)
                rate = len(files) / (time.perf_counter() - t0)
        finally:
            proc.terminate()
            proc.wait(60)
        label = f"Ray Serve, {replicas} replica{'s' if replicas > 1 else ''}" if replicas \
            else "in-process"
        ingest.append([label, rate])
    base = ingest[0][1] if ingest else 1.0
    for row in ingest:
        row.append(row[1] / base)
    return (table(["short text query, sequential", "p50 ms", "p99 ms"], hop),
            table([f"ingest of {len(files)} coco128 JPEGs via gRPC", "img/s",
                   "vs in-process"], ingest) if ingest else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tables", default="store,ray")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--filtered-queries", type=int, default=50,
                   help="filtered searches per store (Milvus scans the JSON of every row)")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--images", type=int, default=128, help="0: no ingest table")
    p.add_argument("--model", default="ViT-B-32",
                   help="for the ray tables; clipsearch-tiny isolates the hop's own cost")
    p.add_argument("--quick", action="store_true", help="10k vectors, 100 queries, 50 calls")
    args = p.parse_args()
    if args.quick:
        args.n, args.queries, args.filtered_queries, args.calls = 10_000, 100, 30, 50
    print(machine())
    print(load())
    with tempfile.TemporaryDirectory() as tmp:
        if "store" in args.tables:
            section(f"Search on {args.n:,} vectors (512-d, k=10, ef 64), one caller",
                    store_table(args.n, args.queries, args.filtered_queries, Path(tmp)))
        if "ray" in args.tables:
            hop, ingest = ray_table(args.calls, args.images, Path(tmp), args.model)
            section(f"The Ray Serve hop ({args.model}, random weights, CPU)", hop)
            if args.images:
                section("Image ingest through a front, encoder in-process or on Ray", ingest)
    print(load())


if __name__ == "__main__":
    main()
