"""Is an int8 path worth building? torch dynamic int8 quantisation against bf16, same run.

Issue 11's rule: consider an opt-in int8 setting only if it runs the image tower at least
1.3x faster than bf16 with cosine >= 0.995 to fp32. This measures torch's own dynamic
quantisation (`torch.ao.quantization.quantize_dynamic`, int8 weights for every nn.Linear,
VNNI kernels on this CPU) on ViT-B-32 with random weights, batches of 16 preprocessed coco128
photos, each variant timed in alternating rounds (the machine is shared: ratios, not absolutes).

Run: .venv/bin/python bench/bench_int8.py
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from bench_throughput import COCO
from common import load, machine, section, table
from PIL import Image

from clipsearch_server.config import Settings
from clipsearch_server.encoders.local.model import load_model

BATCH = 16
ROUNDS = 3


def main() -> int:
    print(f"Machine: {machine()}\nModel: ViT-B-32 (random weights), CPU; {load()} at start")
    fp32 = load_model(Settings(model="ViT-B-32", pretrained=None, random_weights=True,
                               device="cpu", precision="fp32"))
    bf16 = load_model(Settings(model="ViT-B-32", pretrained=None, random_weights=True,
                               device="cpu", precision="bf16"))
    int8 = copy.deepcopy(fp32.module)
    int8 = torch.ao.quantization.quantize_dynamic(int8, {torch.nn.Linear}, dtype=torch.qint8)
    files = sorted(COCO.rglob("*.jpg"))[:64]
    pixels = torch.stack([fp32.transform(Image.open(f).convert("RGB")) for f in files])

    @torch.inference_mode()
    def run_int8(x: torch.Tensor) -> np.ndarray:
        return torch.nn.functional.normalize(int8.encode_image(x), dim=-1).numpy()

    variants = {"fp32": fp32.encode_images, "bf16": bf16.encode_images, "int8 dynamic": run_int8}
    outputs = {name: np.concatenate([fn(pixels[i:i + BATCH]) for i in range(0, 64, BATCH)])
               for name, fn in variants.items()}  # also warms every kernel up
    best = dict.fromkeys(variants, 0.0)
    for _ in range(ROUNDS):
        for name, fn in variants.items():
            started = time.perf_counter()
            for i in range(0, 64, BATCH):
                fn(pixels[i:i + BATCH])
            best[name] = max(best[name], 64 / (time.perf_counter() - started))
    rows = []
    for name in variants:
        cos = (outputs[name] * outputs["fp32"]).sum(axis=1)
        rows.append([name, best[name], f"{best[name] / best['bf16']:.2f}x", float(cos.min())])
    section("Image tower, 64 coco128 photos in batches of 16 (best of 3 rounds)",
            table(["variant", "img/s", "vs bf16", "min cosine to fp32"], rows))
    print(f"\n{load()} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
