"""Load test: a pool of gRPC clients on loopback for a fixed time, plus a flood of big images.

Closed loop: every client sends its next call as soon as the last one answers, so the rate
is the highest the server sustains on this machine. The mix is what a search service sees:
text searches, vector searches, image searches, small upserts and deletes. A second group of
clients floods the server with large images at the same time, so overload protection and
memory bounds are exercised. Passes when: no error except RESOURCE_EXHAUSTED (deliberate
overload), and the server's resident memory grew less than 10 % between the end of warm-up
and the end of the run.

Run: .venv/bin/python bench/load_test.py                 (60 s, ViT-B-32 random weights)
     .venv/bin/python bench/load_test.py --seconds 10    (a smoke run)
"""

from __future__ import annotations

import argparse
import collections
import io
import itertools
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_throughput import COCO, queries, start_server
from common import load, machine, ms, progress, section, table
from PIL import Image

from clipsearch import Client, ClipSearchError

SAMPLE_S = 1.0


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def big_image(seed: int) -> bytes:
    """A 4000x3000 noisy JPEG (about 10 MB): the worst honest thing a client uploads."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--flooders", type=int, default=4)
    args = parser.parse_args(argv)

    print(f"Machine: {machine()}")
    print(f"Model: {args.model} (random weights), CPU; {load()} at start")
    photos = [p.read_bytes() for p in sorted(COCO.rglob("*.jpg"))[:64]]
    floods = [big_image(s) for s in range(2)]
    texts = queries()
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_server(args.model, Path(tmp) / "data", [])
        try:
            with Client(address) as c:
                dim = c.info().dim
                rng = np.random.default_rng(0)
                seed = rng.normal(size=(5000, dim)).astype(np.float32)
                c.upsert("load", ids=[f"s{i}" for i in range(5000)], vectors=seed)
                c.upsert("load", ids=[f"p{i}" for i in range(len(photos))], images=photos)
            result = run(address, args, texts, photos, floods, dim, proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    print(f"\n{load()} at end")
    return 0 if result else 1


def run(address: str, args: argparse.Namespace, texts: list[str], photos: list[bytes],
        floods: list[bytes], dim: int, pid: int) -> bool:
    lock = threading.Lock()
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    codes: collections.Counter[tuple[str, str]] = collections.Counter()
    stop = threading.Event()
    counter = itertools.count()
    measuring = threading.Event()

    def record(op: str, started: float, code: str) -> None:
        if not measuring.is_set():
            return
        with lock:
            codes[(op, code)] += 1
            if code == "OK":
                latencies[op].append(time.perf_counter() - started)

    def worker(n: int) -> None:
        rng = np.random.default_rng(n)
        with Client(address, timeout=60) as c:
            while not stop.is_set():
                i = next(counter)
                roll = rng.random()
                started = time.perf_counter()
                try:
                    if roll < 0.4:
                        op = "search text"
                        c.search("load", text=texts[i % len(texts)], k=10)
                    elif roll < 0.7:
                        op = "search vector"
                        c.search("load", vector=rng.normal(size=dim).astype(np.float32), k=10)
                    elif roll < 0.8:
                        op = "search image"
                        c.search("load", image=photos[i % len(photos)], k=10)
                    elif roll < 0.95:
                        op = "upsert"
                        c.upsert("load", ids=[f"w{n}-{i % 500}"],
                                 vectors=rng.normal(size=(1, dim)).astype(np.float32),
                                 metadata=[{"writer": n}])
                    else:
                        op = "delete"
                        c.delete("load", [f"w{n}-{(i + 250) % 500}"])
                    record(op, started, "OK")
                except ClipSearchError as exc:
                    record(op, started, exc.code.name)

    def flooder(n: int) -> None:
        with Client(address, timeout=120) as c:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    c.embed_images([floods[n % len(floods)]] * 2)
                    record("flood 2x10MB", started, "OK")
                except ClipSearchError as exc:
                    record("flood 2x10MB", started, exc.code.name)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(args.clients)]
    threads += [threading.Thread(target=flooder, args=(n,)) for n in range(args.flooders)]
    for t in threads:
        t.start()
    progress(f"warming up {args.warmup:.0f}s")
    time.sleep(args.warmup)
    measuring.set()
    rss_start = rss_bytes(pid)
    samples = [rss_start]
    progress(f"measuring {args.seconds:.0f}s")
    began = time.perf_counter()
    while time.perf_counter() - began < args.seconds:
        time.sleep(SAMPLE_S)
        samples.append(rss_bytes(pid))
    elapsed = time.perf_counter() - began
    measuring.clear()
    stop.set()
    for t in threads:
        t.join(180)
    rss_end = samples[-1]

    rows = []
    for op in sorted({op for op, _ in codes}):
        ok = codes[(op, "OK")]
        refused = codes[(op, "RESOURCE_EXHAUSTED")]
        other = sum(v for (o, code), v in codes.items()
                    if o == op and code not in ("OK", "RESOURCE_EXHAUSTED"))
        p50, p99 = ms(latencies[op]) if latencies[op] else (float("nan"), float("nan"))
        rows.append([op, ok / elapsed, p50, p99, refused, other])
    section(f"{args.clients} clients + {args.flooders} flooders, {elapsed:.0f} s",
            table(["operation", "ok/s", "p50 ms", "p99 ms", "overloaded", "errors"], rows))
    errors = {k: v for k, v in codes.items() if k[1] not in ("OK", "RESOURCE_EXHAUSTED")}
    growth = (rss_end - rss_start) / rss_start
    print(f"\nServer memory: {rss_start / 2**20:.0f} MiB after warm-up, peak "
          f"{max(samples) / 2**20:.0f} MiB, {rss_end / 2**20:.0f} MiB at the end "
          f"({growth:+.1%}).")
    print(f"Errors other than deliberate overload: {sum(errors.values())} {dict(errors) or ''}")
    passed = not errors and growth < 0.10
    print("PASS" if passed else "FAIL", file=sys.stderr if not passed else sys.stdout)
    return passed


if __name__ == "__main__":
    sys.exit(main())
