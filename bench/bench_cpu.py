"""Speed on whichever CPU is there (issue 17): default ingest against the tower and naive open_clip.

In one run, on this machine's CPU (named with its flags at the top):

1. The image tower alone, in this process, at the precision the server chose, on preprocessed
   coco128 photos, at batch sizes 1 to 32: the ceiling end-to-end ingest is measured against.
2. Naive open_clip: fp32, one image at a time, full decode, hnswlib add (bench_throughput's
   baseline).
3. Each server tree (this one, and `--baseline-tree DIR`, e.g. a `git worktree` of the last
   landed commit) with its default settings, except `--text-cache-size 0` so that every query
   runs the text tower: 4 clients uploading 8 JPEGs a call for `--seconds`, with thumbnails
   (the default) and without; then the same upload with one client searching by text, back
   to back (each query as soon as the last is answered), then 5 searches a second.

`--isa avx2` runs everything as on an AVX2-only CPU (AMD Zen 3): torch's kernels are capped at
AVX2 (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY), and each tree gets
what its defaults choose on a CPU without native bf16: `--backend onnx` (fp32) for this tree,
`--precision fp32` for a baseline tree from before ONNX Runtime. Pillow, hnswlib and ONNX
Runtime still use what the CPU has, so this is close to, not the same as, a real Zen 3.

Run: .venv/bin/python bench/bench_cpu.py [--isa avx2] [--baseline-tree /tmp/landed]
     (about 4 minutes per tree with --seconds 20)
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

from common import limit_isa_before_torch

limit_isa_before_torch()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_interactive import PER_CALL, UPLOADERS, phase  # noqa: E402
from bench_throughput import COCO, Baseline, queries  # noqa: E402
from common import load, machine, ms, progress, section, start_server, table  # noqa: E402
from PIL import Image  # noqa: E402

from clipsearch import Client  # noqa: E402
from clipsearch_server.config import Settings  # noqa: E402
from clipsearch_server.encoders.local.model import load_model  # noqa: E402

QUERY_RATE = 5.0  # a paced searcher: someone typing queries, not a load generator


def tower_speed(model_name: str, precision: str, backend: str, photos: list[Path]
                ) -> dict[int, float]:
    """Image tower img/s by batch size, in this process (best of 3 rounds after a warm-up)."""
    model = load_model(Settings(model=model_name, pretrained=None, random_weights=True,
                                device="cpu", precision=precision if backend == "torch"
                                else "fp32"))
    pixels = torch.stack([model.transform(Image.open(f).convert("RGB")) for f in photos[:64]])
    if backend == "onnxruntime":
        from clipsearch_server.encoders.local.onnx_towers import OnnxTowers

        model = OnnxTowers.from_model(model, Path(tempfile.gettempdir()) / "bench-onnx",
                                      precision)
    speeds = {}
    for size in (1, 4, 8, 16, 32):
        progress(f"tower: batch {size}")
        model.encode_images(pixels[:size])  # oneDNN prepares each shape once
        best = 0.0
        for _ in range(3):
            started = time.perf_counter()
            done = 0
            while done < 32:
                model.encode_images(pixels[:size])
                done += size
            best = max(best, done / (time.perf_counter() - started))
        speeds[size] = best
    return speeds


def naive_speed(model_name: str, photos: list[Path]) -> float:
    """Naive open_clip fp32: one image at a time, full decode, hnswlib add."""
    import hnswlib

    baseline = Baseline(model_name)
    datas = [f.read_bytes() for f in photos[:48]]
    index = hnswlib.Index(space="ip", dim=512)
    index.init_index(max_elements=len(datas), M=16, ef_construction=200)
    baseline.embed_image(datas[0])
    started = time.perf_counter()
    for i, data in enumerate(datas):
        vector = baseline.embed_image(data)
        if vector.shape[1] != index.dim:
            raise RuntimeError(f"the baseline's dimension is {vector.shape[1]}, not 512")
        index.add_items(vector, [i])
    return len(datas) / (time.perf_counter() - started)


def measure_tree(label: str, tree: Path | None, model: str, flags: list[str], seconds: float,
                 photos: list[bytes], texts: list[str]) -> dict:
    """One server tree's ingest (thumbnails on and off) and queries beside ingest."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree / "server"), str(tree / "client")])
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_server(model, Path(tmp) / "data", [
            "--text-cache-size", "0", *flags], env=env)
        try:
            with Client(address, timeout=300) as c:
                c.create_collection("upload")
                c.create_collection("plain", thumbnail_size=0)
                progress(f"{label}: warming up (the batcher measures its batch sizes)")
                phase(address, photos, texts, seconds / 2, False, "warm")
                phase(address, photos, texts, seconds / 4, False, "warm", "plain")
                for text in texts[-20:]:
                    c.search("upload", text=text, k=10)
                out: dict = {}
                progress(f"{label}: upload, thumbnails on")
                n, took, _ = phase(address, photos, texts, seconds, False, "on")
                out["thumbs_on"] = n / took
                progress(f"{label}: upload, thumbnails off")
                n, took, _ = phase(address, photos, texts, seconds, False, "off", "plain")
                out["thumbs_off"] = n / took
                progress(f"{label}: upload with text searches")
                n, took, latencies = phase(address, photos, texts, seconds, True, "mixed")
                out["mixed"] = n / took
                out["queries"] = len(latencies)
                out["p50"], out["p99"] = ms(latencies) if latencies else (np.nan, np.nan)
                progress(f"{label}: upload with {QUERY_RATE:g} text searches a second")
                n, took, latencies = phase(address, photos, texts, seconds, True, "paced",
                                           query_rate=QUERY_RATE)
                out["paced"] = n / took
                out["paced_p50"], out["paced_p99"] = ms(latencies)
                info = c.info()
                out["precision"] = info.precision
                out["backend"] = getattr(info, "backend", "") or "torch"
                towers = getattr(info, "towers", {})
                image = towers.get("image")
                out["batch"] = image.batch_size if image else "-"
                out["reported"] = image.inputs_per_second if image else "-"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native")
    parser.add_argument("--baseline-tree", type=Path, help="another checkout to compare")
    args = parser.parse_args(argv)
    avx2 = args.isa == "avx2"
    isa = ("torch capped at AVX2 (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, "
           "ATEN_CPU_CAPABILITY); each tree as its defaults run without native bf16"
           if avx2 else "native")
    print(f"Machine: {machine()}\nKernels: {isa}\n"
          f"Model: {args.model} (random weights), CPU; {load()} at start")
    files = sorted(COCO.rglob("*.jpg"))
    photos = [f.read_bytes() for f in files]
    texts = queries()
    trees = [("this tree", None, ["--backend", "onnx"] if avx2 else [])]
    if args.baseline_tree:
        trees.append((f"baseline ({args.baseline_tree.name})", args.baseline_tree,
                      ["--precision", "fp32"] if avx2 else []))
    results = {label: measure_tree(label, tree, args.model, flags, args.seconds, photos,
                                   texts) for label, tree, flags in trees}
    chosen, backend = results["this tree"]["precision"], results["this tree"]["backend"]
    progress(f"tower alone: {backend} {chosen}")
    tower = tower_speed(args.model, chosen, backend, files)
    progress("naive open_clip fp32")
    naive = naive_speed(args.model, files)
    best = max(tower.values())
    section(f"The image tower alone, {backend} {chosen}, img/s by batch size (this process)",
            table(["batch", *map(str, tower)], [["img/s", *tower.values()]]))
    rows = []
    for label, r in results.items():
        rows.append([label, f"{r['backend']} {r['precision']}", r["batch"], r["reported"],
                     r["thumbs_on"], r["thumbs_off"], f"{r['thumbs_on'] / r['thumbs_off']:.2f}",
                     f"{r['thumbs_on'] / best:.2f}", f"{r['thumbs_on'] / naive:.2f}"])
    section(f"Ingest, {UPLOADERS} clients x {PER_CALL} coco128 JPEGs a call, default settings; "
            f"tower best {best:.1f} img/s, naive fp32 open_clip {naive:.1f} img/s", table(
                ["server", "backend", "batch", "server's ceiling img/s", "thumbnails img/s",
                 "no thumbnails img/s", "on/off", "vs tower", "vs naive"], rows))
    rows = [[label, r["thumbs_on"], r["mixed"], f"{r['mixed'] / r['thumbs_on']:.2f}",
             r["queries"], r["p50"], r["p99"], r["paced"], f"{r['paced'] / r['thumbs_on']:.2f}",
             r["paced_p50"], r["paced_p99"]] for label, r in results.items()]
    section(f"Text searches (1 client) while {UPLOADERS} clients upload: back to back, and "
            f"{QUERY_RATE:g} a second", table(
                ["server", "upload alone img/s", "upload + queries img/s", "ratio", "searches",
                 "p50 ms", "p99 ms", f"upload + {QUERY_RATE:g} q/s", "ratio", "p50 ms",
                 "p99 ms"], rows))
    print(f"\n{load()} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
