"""Encoded image bytes -> model input tensor: the checked decoder, then open_clip's transform.

The decoding itself (format whitelist, pixel budget, orientation, colour) is in images.py,
shared with the thumbnails; this module adds the model's transform and the JPEG draft size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from ...images import decode_image
from ...thumbnails import thumbnail_of

# JPEG draft decoding keeps the short side at least this many times the model's input size,
# so the transform's own resize still does the final, antialiased, downscale. On the coco128
# photos this keeps the preprocessed tensor within the tolerance that tests/unit/test_preprocess.py
# states (mean absolute difference 0.03 in normalised units).
DRAFT_OVERSAMPLE = 2


class ImagePreprocessor:
    """Bytes -> normalised CHW float tensor, with the model's own open_clip transform."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], max_pixels: int,
                 draft_size: int | None = None) -> None:
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_size = draft_size

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.transform(decode_image(data, self.max_pixels, self.draft_size))

    def with_thumbnail(self, data: bytes, thumbnail_size: int) -> tuple[torch.Tensor, bytes]:
        """The model's input and the item's thumbnail, from one decode.

        The draft decode keeps the short side at least the thumbnail's size too, so a large
        thumbnail is not made from a picture smaller than itself.
        """
        draft = self.draft_size and max(self.draft_size, thumbnail_size)
        img = decode_image(data, self.max_pixels, draft)
        pixels = self.transform(img)
        return pixels, thumbnail_of(img, thumbnail_size)
