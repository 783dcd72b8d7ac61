"""Text-search latency while clients upload images, and what the queries cost the upload.

Four clients upload the coco128 photos, 8 per call, without pause; one client sends text
searches in a closed loop (distinct short captions, the server's text cache off, so every
query runs the text tower). Each server setting is measured twice for the same time: upload
alone, then upload with the queries, and the pair is repeated `--rounds` times (alternating, so
that drift over the run, such as the growing collection, falls on both sides alike). Settings
compared in the same run:

* `--max-model-call-ms 100` (the default): a bulk batch runs as model calls of about 100 ms,
  with the interactive lane served between them;
* `--max-model-call-ms 0`: bulk batches run whole, as before issue 11.

Targets (issue 11, this 2-core CPU): text-search p99 <= 250 ms under upload, and upload
throughput with queries within 15 % of upload alone.

Run: .venv/bin/python bench/bench_interactive.py                (2 rounds of 20 s phases, ~6 min)
     .venv/bin/python bench/bench_interactive.py --seconds 8 --rounds 1   (a smoke run)
"""

from __future__ import annotations

import argparse
import itertools
import signal
import tempfile
import threading
import time
from pathlib import Path

from bench_throughput import COCO, queries, start_server
from common import load, machine, ms, progress, run_for, section, table

from clipsearch import Client

UPLOADERS = 4
PER_CALL = 8


def phase(address: str, photos: list[bytes], texts: list[str], seconds: float,
          with_queries: bool, tag: str, collection: str = "upload", query_rate: float = 0.0
          ) -> tuple[int, float, list[float]]:
    """Upload (and query) for `seconds`: images uploaded, seconds taken, query latencies.

    The query client sends its next query as soon as one is answered, or with `query_rate`,
    one every 1/query_rate seconds (a query answered late is followed at once).
    """
    stop = threading.Event()
    uploaded = [0] * UPLOADERS
    latencies: list[float] = []
    errors: list[BaseException] = []

    def upload(worker: int) -> None:
        try:
            with Client(address) as c:
                for n in itertools.count():
                    if stop.is_set():
                        return
                    start = (n * PER_CALL + worker * 32) % len(photos)
                    batch = [photos[(start + i) % len(photos)] for i in range(PER_CALL)]
                    ids = [f"{tag}-{worker}-{n}-{i}" for i in range(PER_CALL)]
                    c.upsert(collection, ids=ids, images=batch)
                    if not stop.is_set():
                        uploaded[worker] += PER_CALL
        except BaseException as exc:
            errors.append(exc)

    def query() -> None:
        try:
            with Client(address) as c:
                due = time.perf_counter()
                for text in itertools.cycle(texts):
                    if query_rate:
                        stop.wait(max(0.0, due - time.perf_counter()))
                        due += 1 / query_rate
                    if stop.is_set():
                        return
                    started = time.perf_counter()
                    c.search(collection, text=text, k=10)
                    latencies.append(time.perf_counter() - started)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(w,)) for w in range(UPLOADERS)]
    if with_queries:
        threads.append(threading.Thread(target=query))
    for t in threads:
        t.start()
    elapsed = run_for(threads, stop, seconds, errors)
    return sum(uploaded), elapsed, latencies


def measure(address: str, photos: list[bytes], texts: list[str], seconds: float, rounds: int,
            label: str) -> tuple[float, dict[str, float]]:
    """Alternate upload-alone and upload-with-queries phases; (alone img/s, mixed stats)."""
    done = {False: [0, 0.0], True: [0, 0.0]}
    latencies: list[float] = []
    for r in range(rounds):
        for with_queries in (False, True):
            what = "upload + text searches" if with_queries else "upload alone"
            progress(f"{label}: round {r + 1}, {what}")
            n, took, lat = phase(address, photos, texts, seconds, with_queries,
                                 f"{r}{'b' if with_queries else 'a'}")
            done[with_queries][0] += n
            done[with_queries][1] += took
            latencies += lat
    p50, p99 = ms(latencies) if latencies else (float("nan"), float("nan"))
    return done[False][0] / done[False][1], {
        "img_s": done[True][0] / done[True][1], "queries": len(latencies), "p50": p50,
        "p99": p99, "max": max(latencies) * 1e3 if latencies else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="alone/mixed pairs per setting")
    parser.add_argument("--call-ms", type=float, nargs="+", default=[100.0, 0.0],
                        help="--max-model-call-ms values to compare")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args(argv)

    print(f"Machine: {machine()}")
    print(f"Model: {args.model} (random weights), CPU, --precision {args.precision}; "
          f"{load()} at start")
    photos = [p.read_bytes() for p in sorted(COCO.rglob("*.jpg"))]
    texts = queries()
    rows = []
    for call_ms in args.call_ms:
        with tempfile.TemporaryDirectory() as tmp:
            proc, address = start_server(args.model, Path(tmp) / "data", [
                "--text-cache-size", "0", "--max-model-call-ms", str(call_ms),
                "--precision", args.precision])
            try:
                with Client(address) as c:  # warm up both towers and create the collection
                    c.upsert("upload", ids=[f"w{i}" for i in range(16)], images=photos[:16])
                    for text in texts[-20:]:
                        c.search("upload", text=text, k=10)
                alone, mixed = measure(address, photos, texts, args.seconds, args.rounds,
                                       f"--max-model-call-ms {call_ms:g}")
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(120)
        rows.append([f"{call_ms:g}", alone, mixed["img_s"], f"{mixed['img_s'] / alone:.2f}",
                     mixed["queries"], mixed["p50"], mixed["p99"], mixed["max"]])
    section(f"{UPLOADERS} clients uploading coco128 ({PER_CALL} photos a call), "
            f"1 client searching by text, {args.rounds} x {args.seconds:g} s per phase", table(
                ["max-model-call-ms", "upload alone img/s", "upload + queries img/s",
                 "ratio", "text searches", "p50 ms", "p99 ms", "max ms"], rows))
    print(f"\n{load()} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
