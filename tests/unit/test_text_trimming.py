"""Running the text tower only up to the longest sequence equals the padded pass."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from clipsearch_server.config import Settings
from clipsearch_server.encoders.local import model as model_module
from clipsearch_server.encoders.local.model import (
    encode_text_trimmed,
    load_model,
    supports_text_trimming,
)

TEXTS = ["x", "a dog", "two people riding horses on a beach at sunset, photographed from afar",
         "word " * 100]  # the last is cut at the 77-token context, like open_clip does


@pytest.fixture(scope="module")
def clip(tiny_checkpoint):
    return load_model(Settings(model="clipsearch-tiny", pretrained=None,  # exact: fp32
                               checkpoint=tiny_checkpoint, device="cpu", precision="fp32"))


@pytest.mark.parametrize("batch", [TEXTS[:1], TEXTS[:2], TEXTS[:3], TEXTS])
def test_trimmed_equals_padded(clip, batch: list[str]) -> None:
    tokens = clip.tokenizer(batch)
    with torch.inference_mode():
        padded = clip.module.encode_text(tokens, normalize=True).numpy()
        trimmed = torch.nn.functional.normalize(
            encode_text_trimmed(clip.module, tokens), dim=-1).numpy()
    np.testing.assert_allclose(trimmed, padded, atol=1e-5, rtol=0)
    assert clip.trims_text
    np.testing.assert_allclose(clip.encode_texts(batch), padded, atol=1e-5, rtol=0)


def test_models_without_causal_end_token_pooling_use_the_full_pass(
    clip, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = clip.encode_texts(TEXTS)
    monkeypatch.setattr(clip.module, "text_pool_type", "last")
    assert not supports_text_trimming(clip.module)
    monkeypatch.setattr(model_module, "encode_text_trimmed",
                        lambda *a: pytest.fail("trimmed path used"))
    with torch.inference_mode():
        expected = clip.module.encode_text(clip.tokenizer(TEXTS), normalize=True).numpy()
    np.testing.assert_allclose(clip.encode_texts(TEXTS), expected, atol=1e-6)
    assert not np.allclose(expected, reference)  # pooling really changed: the switch matters


def test_only_open_clip_clip_class_qualifies(clip) -> None:
    assert supports_text_trimming(clip.module)
    assert not supports_text_trimming(torch.nn.Linear(2, 2))
    assert isinstance(clip.module, open_clip.CLIP)
