"""The ONNX Runtime towers give ClipModel's embeddings, and their disk cache is reused safely.

One random-weight ViT-B-32 is loaded and exported (fp32 and int8) once for the module; the
reference is the torch fp32 model the graphs were exported from.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from PIL import Image

from clipsearch_server.config import Settings
from clipsearch_server.encoders.local import onnx_towers
from clipsearch_server.encoders.local.model import ClipModel, load_model
from clipsearch_server.encoders.local.onnx_towers import (
    OnnxTowers,
    cache_folder,
    export_towers,
    tower_file,
)
from conftest import coco_images

SIXTY_WORDS = (
    "a crowded street market at dusk where vendors sell ripe mangoes bright scarves old "
    "brass lamps and hot bread while children chase a small brown dog between the stalls "
    "and an old man on a wooden bench reads a folded newspaper under a striped "
    "umbrella as the first street lights flicker on above wet cobblestones and the smell of rain")
TEXTS = [
    "x", "a dog", "cat", "the", "a photo of a red car", "UPPER CASE QUERY",
    "two people riding horses on a beach at sunset", SIXTY_WORDS,
    "naïve café in 東京 🐶", "кошка на столе", "قطة على طاولة", "emoji only 🎉🎉🎉",
    "numbers 1234 5678 and 3.14", "!!! ??? ...", "line one\nline two\tend",
    "<b>bold</b> &amp; tags", "word " * 100,  # over 77 tokens: cut like open_clip cuts it
    "a small wooden boat", "an old clock on a wall in a quiet kitchen", "Ünïcödé ß ø å",
]
# Batches of mixed lengths: each is trimmed to its own longest sequence.
TEXT_BATCHES = [TEXTS[:4], TEXTS[4:8], TEXTS[8:16], TEXTS[16:], TEXTS]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(np.float64) * b).sum(axis=1)


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    return load_model(Settings(model="ViT-B-32", pretrained=None, random_weights=True,
                               device="cpu", precision="fp32"))


@pytest.fixture(scope="module")
def cache_dir(clip: ClipModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("onnx-cache")
    export_towers(clip, root, int8=True)
    return root


@pytest.fixture(scope="module")
def fp32(clip: ClipModel, cache_dir: Path) -> OnnxTowers:
    return OnnxTowers.from_model(clip, cache_dir, "fp32", threads=2)


@pytest.fixture(scope="module")
def int8(clip: ClipModel, cache_dir: Path) -> OnnxTowers:
    return OnnxTowers.from_model(clip, cache_dir, "int8", threads=2)


@pytest.fixture(scope="module")
def pixels(clip: ClipModel) -> torch.Tensor:
    return torch.stack([clip.transform(Image.open(f).convert("RGB"))
                        for f in coco_images(16)])


def test_stands_in_for_clip_model(clip: ClipModel, fp32: OnnxTowers) -> None:
    assert (fp32.backend, fp32.precision) == ("onnxruntime", "fp32")
    assert (fp32.dim, fp32.image_size) == (clip.dim, clip.image_size)
    assert fp32.encode_texts([]).shape == (0, clip.dim)
    assert fp32.encode_images(torch.zeros(0, 3, 224, 224)).shape == (0, clip.dim)
    assert fp32.text_session.get_inputs()[0].shape == ["batch", "length"]
    assert fp32.image_sessions[0].get_inputs()[0].shape == ["batch", 3, 224, 224]
    # The export traced a copy: the serving module keeps its own attention modules.
    for blocks in (clip.module.transformer.resblocks, clip.module.visual.transformer.resblocks):
        assert all(isinstance(b.attn, torch.nn.MultiheadAttention) for b in blocks)


def test_the_image_tower_pauses_between_its_blocks(clip: ClipModel, fp32: OnnxTowers,
                                                    pixels: torch.Tensor) -> None:
    """One graph per block (onnx_stages): `between` runs after each but the last, and the
    vectors are the same as without pausing, and torch's."""
    blocks = len(clip.module.visual.transformer.resblocks)
    assert fp32.pausable and len(fp32.image_sessions) == blocks
    calls: list[int] = []
    paused = fp32.encode_images(pixels[:4], between=lambda: calls.append(1))
    assert len(calls) == blocks - 1
    np.testing.assert_array_equal(paused, fp32.encode_images(pixels[:4]))
    assert cosines(paused, clip.encode_images(pixels[:4])).min() >= 0.9999


def test_images_match_torch(clip: ClipModel, fp32: OnnxTowers, pixels: torch.Tensor) -> None:
    reference = clip.encode_images(pixels)
    for batch in (slice(0, 16), slice(0, 5), slice(5, 16)):
        got = fp32.encode_images(pixels[batch])
        assert got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert cosines(got, reference[batch]).min() >= 0.9999


def test_texts_match_torch(clip: ClipModel, fp32: OnnxTowers) -> None:
    reference = clip.encode_texts(TEXTS)
    with torch.inference_mode():  # open_clip's own padded pass, 77 positions
        padded = clip.module.encode_text(clip.tokenizer(TEXTS), normalize=True).numpy()
    assert cosines(reference, padded).min() >= 0.9999
    for batch in TEXT_BATCHES:
        rows = [TEXTS.index(t) for t in batch]
        got = fp32.encode_texts(batch)
        assert got.shape == (len(batch), clip.dim) and got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert cosines(got, reference[rows]).min() >= 0.9999


def test_long_text_is_truncated_like_open_clip(clip: ClipModel, fp32: OnnxTowers) -> None:
    tokens = clip.tokenizer(["word " * 100])
    assert int(tokens.argmax(dim=-1)) == tokens.shape[1] - 1  # end token forced at 77
    longer = fp32.encode_texts(["word " * 200])
    assert cosines(fp32.encode_texts(["word " * 100]), longer).min() >= 0.99999


def test_rows_do_not_depend_on_their_batch(fp32: OnnxTowers, pixels: torch.Tensor) -> None:
    batch = [TEXTS[1], SIXTY_WORDS, "word " * 100, *TEXTS[8:13]]
    together = fp32.encode_texts(batch)
    alone = np.concatenate([fp32.encode_texts([t]) for t in batch])
    assert cosines(together, alone).min() >= 0.9999
    together = fp32.encode_images(pixels[:8])
    alone = np.concatenate([fp32.encode_images(pixels[i:i + 1]) for i in range(8)])
    assert cosines(together, alone).min() >= 0.9999


def test_int8_stays_close_to_fp32(clip: ClipModel, fp32: OnnxTowers, int8: OnnxTowers,
                                  pixels: torch.Tensor,
                                  record_property: pytest.RecordProperty) -> None:
    for tower in ("image.00", "image.11", "text"):
        assert (int8.folder / tower_file(tower, "int8")).is_file()
    assert int8.precision == "int8"
    images = float(cosines(int8.encode_images(pixels), clip.encode_images(pixels)).min())
    texts = float(cosines(int8.encode_texts(TEXTS), clip.encode_texts(TEXTS)).min())
    record_property("int8_min_cosine_images", images)
    record_property("int8_min_cosine_texts", texts)
    print(f"int8 min cosine to torch fp32: images {images:.5f}, texts {texts:.5f}")
    assert images >= 0.99 and texts >= 0.99  # the benchmark decides the real threshold


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")}


def test_second_start_reuses_the_cache(clip: ClipModel, cache_dir: Path, fp32: OnnxTowers,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    before = _mtimes(fp32.folder)
    stages = [f"image.{i:02d}" for i in range(len(clip.module.visual.transformer.resblocks))]
    assert set(before) == {f"{g}{kind}.onnx" for g in [*stages, "text"]
                           for kind in ("", ".int8")}
    monkeypatch.setattr(onnx_towers, "_export_tower", lambda *a: pytest.fail("exported"))
    monkeypatch.setattr(onnx_towers, "_quantize_tower", lambda *a: pytest.fail("quantised"))
    for precision in ("fp32", "int8"):
        again = OnnxTowers.from_model(clip, cache_dir, precision, threads=1)
        assert again.folder == fp32.folder
    assert _mtimes(fp32.folder) == before


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_damaged_cache_file_is_rebuilt(clip: ClipModel, cache_dir: Path, fp32: OnnxTowers,
                                       precision: str, caplog: pytest.LogCaptureFixture) -> None:
    path = fp32.folder / tower_file("text", precision)
    size = path.stat().st_size
    with open(path, "r+b") as f:  # as a crash mid-write would, were writes not atomic
        f.truncate(size // 3)
    with caplog.at_level(logging.WARNING, logger=onnx_towers.__name__):
        rebuilt = OnnxTowers.from_model(clip, cache_dir, precision, threads=2)
    assert "did not load" in caplog.text
    assert logging.root.manager.disable == logging.NOTSET  # quantising muted logging only briefly
    assert path.stat().st_size > size // 2
    got = rebuilt.encode_texts(TEXTS[:6])
    assert cosines(got, clip.encode_texts(TEXTS[:6])).min() >= (
        0.9999 if precision == "fp32" else 0.99)


def test_interrupted_write_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "image.onnx"

    def crash(path: Path) -> None:
        path.write_bytes(b"half a graph")
        raise KeyboardInterrupt  # as a kill during the export would

    with pytest.raises(KeyboardInterrupt):
        onnx_towers._write_atomically(target, crash)
    assert list(tmp_path.iterdir()) == []
    onnx_towers._write_atomically(target, lambda p: p.write_bytes(b"whole"))
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_cache_key_follows_model_and_versions(clip: ClipModel, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    folder = cache_folder(clip, tmp_path)
    assert folder.parent == tmp_path and folder.name.startswith("ViT-B-32_random-seed-0-")
    monkeypatch.setattr(onnx_towers.ort, "__version__", "0.0.0")
    assert cache_folder(clip, tmp_path) != folder
    monkeypatch.undo()
    other = types.SimpleNamespace(fingerprint="ViT-B-32/sha256:0123456789abcdef")
    assert cache_folder(other, tmp_path) != folder  # type: ignore[arg-type]


def test_only_fp32_models_export(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp32"):
        export_towers(types.SimpleNamespace(precision="bf16"), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision"):
        OnnxTowers.from_model(types.SimpleNamespace(precision="fp32"), tmp_path,  # type: ignore[arg-type]
                              "fp16")
