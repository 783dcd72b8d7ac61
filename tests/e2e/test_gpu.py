"""On a CUDA GPU only: half precision against fp32, and the GPU settings that only run there.

Stated tolerance: with fp16 or bf16 on the GPU, every image and text embedding of ViT-B-32
(seeded random weights) has cosine >= 0.999 to the fp32 embedding of the same input, and a
coco128 self-retrieval finds the same nearest neighbour. fp32 parity with open_clip itself is
tests/e2e/test_parity.py, run with CLIPSEARCH_TEST_DEVICE=cuda.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipsearch_server.config import Settings
from clipsearch_server.encoders.local.model import load_model
from clipsearch_server.encoders.local.preprocess import ImagePreprocessor
from conftest import coco_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = ["a photo of a dog", "two people riding horses on a beach at sunset", "x",
         "a red double-decker bus parked in the street", "a very long caption " * 30]


def _embed(precision: str, **extra: object) -> tuple[np.ndarray, np.ndarray]:
    model = load_model(Settings(model="ViT-B-32", pretrained=None, random_weights=True,
                                device="cuda", precision=precision, **extra))
    host = ImagePreprocessor(model.transform, 40_000_000, None)
    pixels = torch.stack([host(f.read_bytes()) for f in coco_images(64)])
    images = np.concatenate([model.encode_images(pixels[s:s + 32]) for s in range(0, 64, 32)])
    return images, model.encode_texts(TEXTS)


@pytest.fixture(scope="module")
def fp32() -> tuple[np.ndarray, np.ndarray]:
    return _embed("fp32")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_within_tolerance(fp32, precision: str) -> None:
    images, texts = _embed(precision)
    ref_images, ref_texts = fp32
    image_cos = np.sum(images * ref_images, axis=1)
    text_cos = np.sum(texts * ref_texts, axis=1)
    print(f"{precision}: min image cosine {image_cos.min():.6f}, text {text_cos.min():.6f}")
    assert image_cos.min() >= 0.999
    assert text_cos.min() >= 0.999
    # Self-retrieval: each photo's nearest other photo is the same in both precisions.
    def nearest(x: np.ndarray) -> np.ndarray:
        sims = x @ x.T
        np.fill_diagonal(sims, -2)
        return sims.argmax(axis=1)
    assert (nearest(images) == nearest(ref_images)).mean() >= 0.95


def test_fp32_on_the_gpu_does_not_use_tf32(fp32) -> None:
    assert not torch.backends.cudnn.allow_tf32
    assert not torch.backends.cuda.matmul.allow_tf32


def test_compile_on_the_gpu_matches_eager(fp32) -> None:
    images, texts = _embed("fp32", compile=True)
    np.testing.assert_allclose(images, fp32[0], atol=1e-4)
    np.testing.assert_allclose(texts, fp32[1], atol=1e-4)
