"""Which CPU backend runs the CLIP towers fastest: torch (fp32, bf16) or ONNX Runtime (fp32, int8).

Same run, same inputs, alternating rounds, best of 3: the image tower on 64 coco128 photos in
batches of 16, and the text tower on 256 short queries in batches of 32. Each backend's
embeddings are compared with torch fp32's (the reference the ONNX graphs are exported from).
ViT-B-32 with random weights: the compute is a trained model's, the cosines are indicative.

`--isa avx2` makes torch behave as on an AVX2-only CPU: it re-executes itself with
ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN: convolutions, bf16 matmuls), MKL_ENABLE_INSTRUCTIONS=AVX2 (MKL:
fp32 matmuls) and ATEN_CPU_CAPABILITY=avx2 (torch's own vectorised kernels) set before torch is
imported. ONNX Runtime has no such switch (its MLAS kernels pick the ISA from cpuid), so its
rows still use every instruction the CPU has.

Run: .venv/bin/python bench/bench_backends.py [--isa avx2] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
from common import (
    AVX2_ENV,
    cpu_flags,
    limit_isa_before_torch,
    load,
    machine,
    progress,
    section,
    table,
)

limit_isa_before_torch()

# Everything that loads torch comes after the re-execution above.
import torch  # noqa: E402
from bench_throughput import COCO, queries  # noqa: E402
from PIL import Image  # noqa: E402

from clipsearch_server.config import Settings  # noqa: E402
from clipsearch_server.encoders.local.model import ClipModel, load_model  # noqa: E402
from clipsearch_server.encoders.local.onnx_towers import OnnxTowers  # noqa: E402
from clipsearch_server.encoders.local.precision import native_cpu_bf16  # noqa: E402

IMAGES, IMAGE_BATCH = 64, 16
TEXTS, TEXT_BATCH = 256, 32
ROUNDS = 3


class Backend:
    """One row of the table: a name, its two encode functions and its best speeds."""

    def __init__(self, name: str, precision: str, images: Callable[[torch.Tensor], np.ndarray],
                 texts: Callable[[list[str]], np.ndarray]) -> None:
        self.name, self.precision = name, precision
        self.images, self.texts = images, texts
        self.img_s = self.txt_s = 0.0
        self.image_vectors = self.text_vectors = np.zeros(0)

    def run_images(self, pixels: torch.Tensor) -> np.ndarray:
        return np.concatenate([self.images(pixels[i:i + IMAGE_BATCH])
                               for i in range(0, len(pixels), IMAGE_BATCH)])

    def run_texts(self, texts: list[str]) -> np.ndarray:
        return np.concatenate([self.texts(texts[i:i + TEXT_BATCH])
                               for i in range(0, len(texts), TEXT_BATCH)])


def clip(precision: str) -> ClipModel:
    """ViT-B-32 on the CPU; random weights are seeded, so every precision has the same ones."""
    return load_model(Settings(model="ViT-B-32", pretrained=None, random_weights=True,
                               device="cpu", precision=precision))


def onnx_backends(fp32: ClipModel, cache_dir: Path) -> list[Backend]:
    """ONNX Runtime fp32 and int8, timing the first start (export) and a second (cache)."""
    rows = []
    for precision in ("fp32", "int8"):
        started = time.perf_counter()
        OnnxTowers.from_model(fp32, cache_dir, precision)
        first = time.perf_counter() - started
        started = time.perf_counter()
        towers = OnnxTowers.from_model(fp32, cache_dir, precision)
        print(f"ONNX Runtime {precision}: first start (export/quantise) {first:.1f} s, "
              f"second start (from the cache) {time.perf_counter() - started:.2f} s")
        rows.append(Backend("onnxruntime", precision, towers.encode_images,
                            towers.encode_texts))
    return rows


def measure(backends: list[Backend], pixels: torch.Tensor, texts: list[str]) -> None:
    """Warm every backend up (keeping its vectors), then best of ROUNDS alternating rounds."""
    for backend in backends:
        progress(f"warming up {backend.name} {backend.precision}")
        backend.image_vectors = backend.run_images(pixels)
        backend.text_vectors = backend.run_texts(texts)
    for round_ in range(ROUNDS):
        progress(f"round {round_ + 1} of {ROUNDS}")
        for backend in backends:
            started = time.perf_counter()
            backend.run_images(pixels)
            backend.img_s = max(backend.img_s, len(pixels) / (time.perf_counter() - started))
            started = time.perf_counter()
            backend.run_texts(texts)
            backend.txt_s = max(backend.txt_s, len(texts) / (time.perf_counter() - started))


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.astype(np.float64) * b).sum(axis=1).min())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--isa", choices=["native", "avx2"], default="native",
                        help="avx2: limit torch to AVX2 (ONNX Runtime cannot be limited)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="ONNX graph cache (default: a fresh temporary folder)")
    args = parser.parse_args()
    print(f"Machine: {machine()}")
    print(f"CPU flags: {cpu_flags()}")
    print(f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}"
          f", {torch.get_num_threads()} threads), onnxruntime {metadata.version('onnxruntime')}"
          f" ({os.cpu_count()} threads); {load()} at start")
    if args.isa == "avx2":
        print("ISA: torch limited to AVX2 (" + ", ".join(f"{k}={v}" for k, v in AVX2_ENV.items())
              + "); ONNX Runtime has no such limit and still uses every instruction of this "
              "CPU, so its rows are not an AVX2 CPU's")
    else:
        print("ISA: native (every instruction of this CPU, for torch and ONNX Runtime)")
    fp32 = clip("fp32")
    backends = [Backend("torch", "fp32", fp32.encode_images, fp32.encode_texts)]
    flag = native_cpu_bf16()
    if args.isa == "avx2":
        print("torch bf16: skipped, an AVX2-only CPU has no native bf16 (torch would emulate it)")
    elif flag is None:
        print("torch bf16: skipped, this CPU has no native bf16 (torch would emulate it, "
              "slower than fp32)")
    else:
        bf16 = clip("bf16")
        backends.append(Backend("torch", "bf16", bf16.encode_images, bf16.encode_texts))
        print(f"torch bf16: measured, the CPU computes bf16 natively ({flag})")
    with tempfile.TemporaryDirectory(prefix="clipsearch-onnx-") as temp:
        backends += onnx_backends(fp32, args.cache_dir or Path(temp))
        files = sorted(COCO.rglob("*.jpg"))[:IMAGES]
        pixels = torch.stack([fp32.transform(Image.open(f).convert("RGB")) for f in files])
        texts = queries()[:TEXTS]
        measure(backends, pixels, texts)
    base = backends[0]
    rows = [[b.name, b.precision, b.img_s, f"{b.img_s / base.img_s:.2f}x",
             f"{min_cosine(b.image_vectors, base.image_vectors):.5f}", b.txt_s,
             f"{b.txt_s / base.txt_s:.2f}x",
             f"{min_cosine(b.text_vectors, base.text_vectors):.5f}"]
            for b in backends]
    section(f"ViT-B-32 towers on the CPU, ISA {args.isa}: {len(pixels)} coco128 photos in "
            f"batches of {IMAGE_BATCH}, {len(texts)} short queries in batches of {TEXT_BATCH} "
            f"(best of {ROUNDS} alternating rounds)",
            table(["backend", "precision", "img/s", "vs torch fp32",
                   "min cosine to torch fp32 (images)", "texts/s", "vs torch fp32",
                   "min cosine (texts)"], rows))
    print(f"\n{load()} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
