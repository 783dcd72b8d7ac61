"""The server's embeddings equal open_clip's own encode_text / encode_image, normalised."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipsearch import Client
from clipsearch_server.catalog import bundled_config_dir
from conftest import TEST_DEVICE, TINY_MODEL, ServerProcess, coco_images

# On a GPU (CLIPSEARCH_TEST_DEVICE=cuda) fp32 kernels sum in another order than the CPU's.
ATOL = 1e-5 if TEST_DEVICE == "cpu" else 1e-4
TEXTS = [
    "a photo of a dog",
    "two people riding horses on a beach at sunset",
    "A RED double-decker bus, parked.",
    "x",
    "a very long caption " * 30,  # longer than the 77-token context: truncated like open_clip
]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with open_clip's exact preprocessing (no JPEG draft or device decoding) and
    arithmetic (fp32: the default, auto, picks bf16 where the hardware has it;
    test_precision.py states that tolerance)."""
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("parity") / "data",
                         "--no-jpeg-draft", "--device-decode", "off",
                         "--precision", "fp32").start()
    yield proc
    assert proc.stop() == 0, proc.log()


def _reference(checkpoint):
    open_clip.add_model_config(bundled_config_dir())
    model, _, preprocess = open_clip.create_model_and_transforms(
        TINY_MODEL, pretrained=str(checkpoint))
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(TINY_MODEL)


def _upright(path) -> bool:
    with Image.open(path) as img:
        return img.getexif().get(0x0112, 1) == 1


def test_text_and_image_embeddings_match_open_clip(client: Client, tiny_checkpoint) -> None:
    model, preprocess, tokenizer = _reference(tiny_checkpoint)
    files = [f for f in coco_images(24) if _upright(f)][:16]
    assert len(files) >= 8
    with torch.inference_mode():
        ref_text = model.encode_text(tokenizer(TEXTS), normalize=True).numpy()
        pixels = torch.stack([preprocess(Image.open(f)) for f in files])
        ref_image = model.encode_image(pixels, normalize=True).numpy()

    np.testing.assert_allclose(client.embed_texts(TEXTS), ref_text, atol=ATOL, rtol=0)
    np.testing.assert_allclose(client.embed_images(files), ref_image, atol=ATOL, rtol=0)
    # The embeddings carry information: different inputs, different vectors.
    assert np.abs(ref_text[0] - ref_text[1]).max() > 1e-3
