"""Encoded image bytes -> an upright 8-bit RGB picture, strictly. No torch: fronts use it too.

Decoding is where hostile input arrives, so it is strict: only the formats we name, a pixel
budget checked from the header before any pixel is decoded, and every failure reported as an
InvalidArgument for that one image. Orientation and colour handling make a phone photo, a
transparent logo and a 16-bit scan all look to the model as a person would see them. The
local encoder's preprocessing (encoders/local/preprocess.py) and the thumbnails both decode here.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidArgument
from .formats import ACCEPTED_FORMATS, accepted_names

# Pillow's own bomb guard is process-wide and fixed; ours (--max-image-pixels) is checked from
# the header in decode_image before any pixel is decoded, so Pillow's is switched off.
Image.MAX_IMAGE_PIXELS = None

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open an image's header, or raise InvalidArgument: format whitelist and pixel budget.

    Only the header is read: no pixel is decoded before the budget is checked.
    """
    if not data:
        raise InvalidArgument("image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidArgument(
            f"not a decodable image; accepted formats are {accepted_names()}") from None
    except Exception as exc:  # Pillow raises many types on hostile headers
        raise InvalidArgument(f"corrupt image header: {exc}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidArgument(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (decompression-bomb guard)"
        )
    return img


def decode_image(data: bytes, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode one image to an upright 8-bit RGB picture, or raise InvalidArgument.

    With `draft_size`, a JPEG whose short side is at least twice that is decoded at a reduced
    scale (libjpeg's DCT scaling: 1/2, 1/4 or 1/8) keeping its short side >= `draft_size`.
    A 12-megapixel photo then decodes from 1/64 of its pixels, several times faster.
    """
    img = open_checked(data, max_pixels)
    width, height = img.size
    if draft_size and img.format in ("JPEG", "MPO") and min(width, height) >= 2 * draft_size:
        short = min(width, height)
        img.draft(img.mode, (math.ceil(draft_size * width / short),
                             math.ceil(draft_size * height / short)))
    try:
        img.seek(0)  # animated images: the first frame
        img.load()
    except Exception as exc:
        raise InvalidArgument(f"truncated or corrupt {img.format} image: {exc}") from None
    # A broken EXIF block leaves the picture as stored, which is still usable.
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent areas become white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img), mode), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise InvalidArgument(f"unsupported colour mode {mode}: {exc}") from None


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale high-bit-depth greyscale to 0..255 instead of clipping it to white."""
    if mode == "F":
        arr = arr.astype(np.float64)
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale, 0, 255).astype(np.uint8)
    wide = arr.astype(np.int64)
    if mode != "I" or (wide.size and wide.max() > 255):
        wide = wide >> 8
    return np.clip(wide, 0, 255).astype(np.uint8)
