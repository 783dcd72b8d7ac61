"""End to end on ONNX Runtime: `--backend onnx` and `--precision int8`, through a real server.

The rest of the suite pins `--backend torch` (conftest.ServerProcess) so that it tests the same
thing on every CPU; here the towers are exported from the same checkpoint through the real
loading path, cached under the data dir, and served. Their vectors are compared with torch's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipsearch import Client
from clipsearch_server.config import Settings
from clipsearch_server.encoders.local.model import load_model
from conftest import TINY_MODEL, ServerProcess, coco_images

pytest.importorskip("onnxruntime")

TEXTS = ["a dog", "a red bicycle leaning on a wall", "ünïcödé café", "two cats " * 30]


@pytest.fixture(scope="module")
def torch_vectors(tiny_checkpoint: Path) -> tuple[np.ndarray, np.ndarray]:
    """The same checkpoint's fp32 vectors from torch, in this process (no JPEG draft)."""
    model = load_model(Settings(model=TINY_MODEL, pretrained=None, checkpoint=tiny_checkpoint,
                                device="cpu", precision="fp32"))
    import torch
    from PIL import Image

    pixels = torch.stack([model.transform(Image.open(f).convert("RGB"))
                          for f in coco_images(8)])
    return model.encode_images(pixels), model.encode_texts(TEXTS)


def _served(server: ServerProcess) -> tuple[np.ndarray, np.ndarray, object]:
    with Client(server.address) as c:
        images = c.embed_images([f.read_bytes() for f in coco_images(8)])
        texts = c.embed_texts(TEXTS)
        return images, texts, c.info()


def test_onnx_fp32_serves_torch_vectors_and_reuses_its_export(
        tiny_checkpoint: Path, tmp_path: Path, torch_vectors) -> None:
    data = tmp_path / "data"
    server = ServerProcess(tiny_checkpoint, data, "--backend", "onnx", "--no-jpeg-draft").start()
    try:
        images, texts, info = _served(server)
        with Client(server.address) as c:  # ingest and search work as on torch
            files = coco_images(8)
            c.upsert("pics", ids=[f.name for f in files], images=files)
            hit = c.search("pics", image=files[3].read_bytes(), k=1)[0]
            assert hit.id == files[3].name and hit.score == pytest.approx(1.0, abs=1e-4)
            image = c.info().towers["image"]  # the upload ran bulk calls, which can pause
    finally:
        assert server.stop() == 0, server.log()
    assert (info.backend, info.precision) == ("onnxruntime", "fp32")
    assert info.backend_reason == "--backend onnx was asked for"
    for ours, want in ((images, torch_vectors[0]), (texts, torch_vectors[1])):
        assert (ours * want).sum(axis=1).min() >= 0.9999
    graphs = sorted((data / "onnx").rglob("*.onnx"))
    assert [g.name for g in graphs][-2:] == ["image.01.onnx", "text.onnx"]  # a graph a block
    assert "queries served between the call's blocks" in image.reason
    stamps = [g.stat().st_mtime_ns for g in graphs]
    again = ServerProcess(tiny_checkpoint, data, "--backend", "onnx").start()
    try:
        assert _served(again)[2].backend == "onnxruntime"
    finally:
        assert again.stop() == 0, again.log()
    assert [g.stat().st_mtime_ns for g in graphs] == stamps  # loaded, not exported again


def test_int8_is_an_opt_in_on_onnx_runtime_within_its_tolerance(
        tiny_checkpoint: Path, tmp_path: Path, torch_vectors) -> None:
    server = ServerProcess(tiny_checkpoint, tmp_path / "data", "--backend", "auto",
                           "--precision", "int8", "--no-jpeg-draft").start()
    try:
        images, texts, info = _served(server)
    finally:
        assert server.stop() == 0, server.log()
    assert (info.backend, info.precision) == ("onnxruntime", "int8")
    assert info.backend_reason == "auto: --precision int8 runs on ONNX Runtime"
    # README states int8's tolerance: cosine >= 0.995 to fp32 (ViT-B-32 measured 0.9992)
    for ours, want in ((images, torch_vectors[0]), (texts, torch_vectors[1])):
        assert (ours * want).sum(axis=1).min() >= 0.995


def test_int8_on_torch_is_refused_before_loading(tiny_checkpoint: Path, tmp_path: Path) -> None:
    server = ServerProcess(tiny_checkpoint, tmp_path / "data", "--backend", "torch",
                           "--precision", "int8")
    with pytest.raises(RuntimeError, match="--precision int8 runs on ONNX Runtime"):
        server.start(timeout=60)
