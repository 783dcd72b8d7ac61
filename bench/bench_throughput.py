"""Throughput: clipsearch through gRPC against naive open_clip, measured in the same run.

The baseline is open_clip called directly, one request at a time (a lock serialises the
model), padded 77-token text and the standard transform on a full decode: what a hand-rolled
service does. Both sides run ViT-B-32 (or --model) with random weights, which cost the same
compute as trained ones. Tables:

1. text queries per second and p50/p99 latency with 1, 8 and 32 concurrent clients
   (short queries, under 16 tokens; the server runs with --text-cache-size 0 so that every
   query is computed: the cache would otherwise answer the repeats);
2. image ingest per second from the coco128 JPEG files, bytes to indexed;
3. search latency p50/p99 on a 100k collection: through gRPC, and hnswlib called in-process
   on the same vectors (the difference is what the service adds).

Run: .venv/bin/python bench/bench_throughput.py            (about 10 minutes on 2 cores)
     .venv/bin/python bench/bench_throughput.py --quick    (a smoke run)
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import hnswlib
import numpy as np
import open_clip
import torch
from common import load, machine, ms, progress, section, start_server, table
from PIL import Image

from clipsearch import Client

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco128"
ADJECTIVES = ["red", "small", "old", "happy", "wet", "shiny", "striped", "wooden", "tall",
              "sleepy", "broken", "golden", "fluffy", "empty", "crowded", "frozen"]
NOUNS = ["dog", "cat", "car", "bicycle", "boat", "kitchen", "street", "pizza", "horse",
         "train", "beach", "bird", "umbrella", "laptop", "clock", "giraffe"]
PLACES = ["in the park", "at night", "on a table", "near the sea", "in the snow",
          "on the road", "under a tree", "in a city"]


def queries() -> list[str]:
    """Distinct short captions (6 to 9 words, well under 16 tokens)."""
    return [f"a photo of a {a} {n} {p}" for a, n, p in itertools.product(ADJECTIVES, NOUNS,
                                                                          PLACES)]


# --- the server -----------------------------------------------------------------------------
# --- load generation ------------------------------------------------------------------------
def run_clients(clients: int, seconds: float, work: Callable[[int, int], None]
                ) -> tuple[float, list[float]]:
    """`clients` threads call work(client, i) until `seconds` pass: (per second, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    errors: list[BaseException] = []

    def loop(c: int) -> None:
        mine = []
        for i in itertools.count():
            if time.perf_counter() >= stop:
                break
            started = time.perf_counter()
            try:
                work(c, i)
            except BaseException as exc:  # reported, and the numbers are void
                errors.append(exc)
                break
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    began = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed, first: {errors[0]!r}")
    return len(latencies) / (time.perf_counter() - began), latencies


class Baseline:
    """open_clip used the simple way: one request at a time, padded text, full decode."""

    def __init__(self, model: str) -> None:
        torch.manual_seed(0)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.lock = threading.Lock()

    @torch.inference_mode()
    def embed_text(self, text: str) -> np.ndarray:
        with self.lock:
            return self.model.encode_text(self.tokenizer([text]), normalize=True).numpy()

    @torch.inference_mode()
    def embed_image(self, data: bytes) -> np.ndarray:
        image = self.preprocess(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)
        with self.lock:
            return self.model.encode_image(image, normalize=True).numpy()


def text_table(client_for: Callable[[int], Client], baseline: Baseline, seconds: float,
               levels: list[int]) -> str:
    texts = queries()
    counter = itertools.count()
    rows = []
    for clients in levels:
        progress(f"text: {clients} clients, clipsearch")
        ours_qps, ours_lat = run_clients(
            clients, seconds,
            lambda c, i: client_for(c).embed_texts([texts[next(counter) % len(texts)]]))
        progress(f"text: {clients} clients, baseline")
        base_qps, base_lat = run_clients(
            clients, seconds,
            lambda c, i: baseline.embed_text(texts[next(counter) % len(texts)]))
        rows.append([clients, ours_qps, *ms(ours_lat), base_qps, *ms(base_lat),
                     ours_qps / base_qps])
    return table(["clients", "clipsearch q/s", "p50 ms", "p99 ms", "baseline q/s", "p50 ms",
                  "p99 ms", "ratio"], rows)


def image_table(client: Client, baseline: Baseline, files: list[Path], dim: int) -> str:
    datas = [f.read_bytes() for f in files]
    progress(f"images: {len(files)} through clipsearch")
    started = time.perf_counter()
    client.upsert("bench-images", ids=[f.name for f in files], images=datas)
    ours = len(files) / (time.perf_counter() - started)
    progress(f"images: {len(files)} through the baseline")
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=len(files), M=16, ef_construction=200)
    started = time.perf_counter()
    for i, data in enumerate(datas):
        index.add_items(baseline.embed_image(data), [i])
    base = len(files) / (time.perf_counter() - started)
    return table(["images", "clipsearch img/s", "baseline img/s", "ratio"],
                 [[len(files), ours, base, ours / base]])


def search_table(client: Client, n: int, dim: int, count: int) -> str:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, dim))
    vectors = centres[rng.integers(0, 1000, n)] + 0.6 * rng.normal(size=(n, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    progress(f"search: loading {n} vectors through gRPC")
    for s in range(0, n, 2000):
        client.upsert("bench-100k", ids=[f"v{i}" for i in range(s, min(n, s + 2000))],
                      vectors=vectors[s:s + 2000])
    queries_ = vectors[rng.integers(0, n, count)] + 0.05 * rng.normal(size=(count, dim))
    queries_ = (queries_ / np.linalg.norm(queries_, axis=1, keepdims=True)).astype(np.float32)
    progress("search: through gRPC")
    for q in queries_[:50]:
        client.search("bench-100k", vector=q, k=10)
    ours = []
    for q in queries_:
        started = time.perf_counter()
        client.search("bench-100k", vector=q, k=10)
        ours.append(time.perf_counter() - started)
    progress("search: hnswlib in-process on the same vectors")
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=n, M=16, ef_construction=200)
    index.add_items(vectors, np.arange(n))
    index.set_ef(64)
    raw = []
    for q in queries_:
        started = time.perf_counter()
        index.knn_query(q.reshape(1, -1), k=10, num_threads=1)
        raw.append(time.perf_counter() - started)
    (o50, o99), (r50, r99) = ms(ours), ms(raw)
    return table(["collection", "clipsearch p50 ms", "p99 ms", "hnswlib p50 ms", "p99 ms",
                  "added p50 ms"], [[n, o50, o99, r50, r99, o50 - r50]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--quick", action="store_true", help="a few seconds per table")
    parser.add_argument("--seconds", type=float, default=20.0, help="per text measurement")
    parser.add_argument("--tables", default="text,images,search",
                        help="which tables to measure (comma-separated)")
    parser.add_argument("--server-args", default="--text-cache-size 0",
                        help="extra flags for the server (default: no query cache)")
    args = parser.parse_args(argv)
    seconds = 3.0 if args.quick else args.seconds
    files = sorted(COCO.rglob("*.jpg"))[: 32 if args.quick else None]
    n = 5_000 if args.quick else 100_000
    torch.set_num_threads(os.cpu_count() or 1)

    print(f"Machine: {machine()}")
    print(f"Model: {args.model} (random weights), CPU; {load()} at start")
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_server(args.model, Path(tmp) / "data", args.server_args.split())
        clients: dict[int, Client] = {}

        def client_for(c: int) -> Client:
            if c not in clients:
                clients[c] = Client(address, timeout=120)
            return clients[c]

        try:
            baseline = Baseline(args.model)
            dim = client_for(0).info().dim
            tables = args.tables.split(",")
            if "text" in tables:
                section("Text queries (one short query per call)",
                        text_table(client_for, baseline, seconds, [1, 8, 32]))
            if "images" in tables:
                section("Image ingest, coco128 JPEGs, bytes to indexed",
                        image_table(client_for(0), baseline, files, dim))
            del baseline
            if "search" in tables:
                section(f"Search latency, {n:,} vectors, k=10, one client",
                        search_table(client_for(0), n, dim, 300 if args.quick else 2000))
        finally:
            for c in clients.values():
                c.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    print(f"\n{load()} at end")


if __name__ == "__main__":
    main()
