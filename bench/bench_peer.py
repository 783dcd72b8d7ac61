"""clipsearch against a peer server, Infinity (PyPI `infinity_emb`), in the same run.

Infinity is the HTTP embedding server with dynamic batching that serves CLIP through Hugging
Face `transformers`. Both serve the same architecture with random weights: ViT-B/32, as an
open_clip model in clipsearch and as a transformers `CLIPModel` (saved locally with its image
processor, and a tokenizer built from open_clip's bundled BPE vocabulary) in Infinity. The
same short distinct texts and coco128 photos go to both, with the same concurrency, one
server at a time on the same machine:

* short texts, one per request: q/s and p50/p99 at 1 and 32 clients (clipsearch EmbedTexts
  with its text cache off; Infinity POST /embeddings);
* images: 4 clients sending 8 coco128 JPEGs per request (EmbedImages; /embeddings with
  modality image and base64 data URIs): images/s.

Runs twice: both in fp32, and each at its best setting for this CPU (clipsearch: --precision
auto, bf16 here; Infinity: its CPU path runs fp32 whatever --dtype says, so fp32).

Infinity is not a project dependency: this script installs it into its own virtual
environment under bench/out/ (git-ignored) on first use, with aiohttp, which its image
path imports but its `server` extra does not install.

`--isa avx2` caps torch's kernels at AVX2 in both servers (bench/common.AVX2_ENV), as on an
AMD Zen 3, and runs clipsearch's best as its defaults run on a CPU without native bf16:
`--backend onnx` (ONNX Runtime fp32, which has no such cap).

Run: .venv/bin/python bench/bench_peer.py [--isa avx2]    (~10 minutes, plus the install)
     .venv/bin/python bench/bench_peer.py --seconds 5     (a smoke run)
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    AVX2_ENV,
    limit_isa_before_torch,
    load,
    machine,
    ms,
    progress,
    run_for,
    section,
    table,
)

limit_isa_before_torch()

import open_clip  # noqa: E402
from bench_throughput import COCO, queries, start_server  # noqa: E402

from clipsearch import Client  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
VENV = OUT / "infinity-venv"
INFINITY = "infinity_emb[server,torch]==0.0.78"
MODEL_DIR = OUT / "clip-vit-b32-random"
IMAGE_CLIENTS = 4
IMAGES_PER_CALL = 8

# Runs in Infinity's venv (it has transformers): a random ViT-B/32 CLIPModel with its
# processor, the tokenizer files built from open_clip's BPE merges the way open_clip reads them.
BUILD_MODEL = textwrap.dedent("""
    import gzip, json, sys
    import torch
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizer, CLIPTokenizerFast)
    from transformers.models.clip.tokenization_clip import bytes_to_unicode
    bpe, out = sys.argv[1], sys.argv[2]
    merges = gzip.open(bpe).read().decode("utf-8").split("\\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(f"{out}/vocab.json", "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(f"{out}/merges.txt", "w") as f:
        f.write("#version: 0.2\\n" + "\\n".join(merges) + "\\n")
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig())  # the defaults are ViT-B/32 with a 512-d projection
    model.save_pretrained(out)
    tokenizer = CLIPTokenizerFast(vocab_file=f"{out}/vocab.json", merges_file=f"{out}/merges.txt",
                                  model_max_length=77)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(out)
    print(tokenizer("a photo of a dog")["input_ids"])
""")


def ensure_infinity() -> Path:
    """Infinity's own venv under bench/out; returns its `infinity_emb` command."""
    command = VENV / "bin" / "infinity_emb"
    if not command.exists():
        progress(f"installing {INFINITY} into {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", INFINITY, "pillow",
                        "aiohttp"],
                       check=True)
    if not (MODEL_DIR / "config.json").exists():
        MODEL_DIR.mkdir(parents=True, exist_ok=True)
        bpe = open_clip.tokenizer.default_bpe()
        subprocess.run([str(VENV / "bin" / "python"), "-c", BUILD_MODEL, bpe, str(MODEL_DIR)],
                       check=True)
    return command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_infinity(command: Path, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [str(command), "v2", "--model-id", str(MODEL_DIR), "--served-model-name", "clip",
         "--port", str(port), "--host", "127.0.0.1", "--device", "cpu", "--engine", "torch",
         "--dtype", "float32", "--no-bettertransformer", "--batch-size", "32"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        env={**os.environ, "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"})
    for _ in range(1800):
        if proc.poll() is not None:
            raise RuntimeError(f"Infinity exited; see {log}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("Infinity did not start")


class InfinityClient:
    """POST /embeddings over one keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def embed(self, inputs: list[str], modality: str = "text") -> int:
        body = json.dumps({"model": "clip", "input": inputs, "modality": modality})
        self.conn.request("POST", "/embeddings", body, {"Content-Type": "application/json"})
        reply = self.conn.getresponse()
        data = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"Infinity answered {reply.status}: {data[:300]!r}")
        return len(json.loads(data)["data"])


def closed_loop(clients: int, seconds: float, make: Callable[[], Callable[[int], int]]
                ) -> tuple[float, float, float]:
    """(items/s, p50 ms, p99 ms) of `clients` threads calling their function back to back."""
    stop = threading.Event()
    latencies: list[float] = []
    counts = [0] * clients
    errors: list[BaseException] = []
    ready = threading.Barrier(clients + 1)

    def worker(w: int) -> None:
        try:
            call = make()
            call(w)  # connect and warm up outside the timed window
            ready.wait()
            i = w
            while not stop.is_set():
                started = time.perf_counter()
                n = call(i)
                latencies.append(time.perf_counter() - started)
                if not stop.is_set():
                    counts[w] += n
                i += clients
        except BaseException as exc:
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        for t in threads:
            t.join()
        raise errors[0] from None
    elapsed = run_for(threads, stop, seconds, errors)
    p50, p99 = ms(latencies)
    return sum(counts) / elapsed, p50, p99


def measure(name: str, text_call: Callable[[], Callable[[int], int]],
            image_call: Callable[[], Callable[[int], int]], seconds: float) -> dict:
    result = {}
    for clients in (1, 32):
        progress(f"{name}: texts, {clients} clients")
        result[f"text{clients}"] = closed_loop(clients, seconds, text_call)
    progress(f"{name}: images")
    result["images"] = closed_loop(IMAGE_CLIENTS, seconds, image_call)
    return result


def run_clipsearch(flags: list[str], texts: list[str], photos: list[bytes], seconds: float,
                   tmp: Path) -> dict:
    proc, address = start_server("ViT-B-32", tmp / f"data-{'-'.join(flags)}",
                                 ["--text-cache-size", "0", *flags])
    try:
        def text_call() -> Callable[[int], int]:
            client = Client(address)
            return lambda i: len(client.embed_texts([texts[i % len(texts)]]))

        def image_call() -> Callable[[int], int]:
            client = Client(address)
            return lambda i: len(client.embed_images(
                [photos[(i * IMAGES_PER_CALL + j) % len(photos)]
                 for j in range(IMAGES_PER_CALL)]))

        with Client(address) as c:
            info = c.info()
        asked = " ".join(flags)
        return {"setting": f"{asked} ({info.backend} {info.precision})",
                **measure(f"clipsearch {asked}", text_call, image_call, seconds)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def run_infinity(command: Path, texts: list[str], photos: list[bytes], seconds: float,
                 tmp: Path) -> dict:
    proc, port = start_infinity(command, tmp / "infinity.log")
    uris = ["data:image/jpeg;base64," + base64.b64encode(p).decode() for p in photos]
    try:
        def text_call() -> Callable[[int], int]:
            client = InfinityClient(port)
            return lambda i: client.embed([texts[i % len(texts)]])

        def image_call() -> Callable[[int], int]:
            client = InfinityClient(port)
            return lambda i: client.embed([uris[(i * IMAGES_PER_CALL + j) % len(uris)]
                                           for j in range(IMAGES_PER_CALL)], "image")

        return {"setting": "torch engine, fp32 (its CPU path), batch 32",
                **measure("Infinity", text_call, image_call, seconds)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def rows_for(label: str, ours: dict, peer: dict) -> list[list[object]]:
    rows = []
    for key, what in (("text1", "short texts, 1 client"), ("text32", "short texts, 32 clients"),
                      ("images", f"images, {IMAGE_CLIENTS} clients x {IMAGES_PER_CALL}")):
        (a, a50, a99), (b, b50, b99) = ours[key], peer[key]
        rows.append([label, what, a, a50, a99, b, b50, b99, f"{a / b:.2f}x"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--isa", choices=("native", "avx2"), default="native",
                        help="avx2: torch capped at AVX2 in both servers (see above)")
    args = parser.parse_args(argv)
    best_flags = ["--backend", "onnx"] if args.isa == "avx2" else ["--precision", "auto"]
    print(f"Machine: {machine()}")
    if args.isa == "avx2":
        print("Kernels: torch capped at AVX2 in both servers (" +
              ", ".join(f"{k}={v}" for k, v in AVX2_ENV.items()) + ")")
    print(f"Model: ViT-B/32 (random weights) on both, CPU; {load()} at start")
    command = ensure_infinity()
    texts = queries()
    photos = [p.read_bytes() for p in sorted(COCO.rglob("*.jpg"))]
    with tempfile.TemporaryDirectory() as tmp:
        infinity = run_infinity(command, texts, photos, args.seconds, Path(tmp))
        fp32 = run_clipsearch(["--precision", "fp32"], texts, photos, args.seconds, Path(tmp))
        best = run_clipsearch(best_flags, texts, photos, args.seconds, Path(tmp))
    section("clipsearch vs Infinity, same texts, photos and concurrency", table(
        ["run", "load", "clipsearch /s", "p50 ms", "p99 ms", "Infinity /s", "p50 ms", "p99 ms",
         "ratio"], rows_for("both fp32", fp32, infinity) + rows_for("each at its best", best,
                                                                      infinity)))
    print(f"\nclipsearch: {fp32['setting']} / {best['setting']}; Infinity: {infinity['setting']}")
    print(f"\n{load()} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
