"""Small WebP previews of image items, kept in the collection's database for the search page.

A thumbnail is made from the same bytes that were embedded, with the same decoder (formats,
decompression-bomb guard, EXIF orientation, colour modes), so an image that was accepted always
gets one. Large JPEGs decode at a reduced scale first, which makes this cheap next to the model.
"""

from __future__ import annotations

import io

from PIL import Image

from .errors import InvalidArgument
from .images import decode_image

# Long side in pixels of the thumbnails of collections that do not choose; 0 = none.
DEFAULT_THUMBNAIL_SIZE = 256
WEBP_QUALITY = 80
MAX_THUMBNAIL_SIZE = 1024
CONTENT_TYPE = "image/webp"


def check_size(size: int) -> None:
    """Thumbnail sizes are 0 (none) or 16..MAX_THUMBNAIL_SIZE pixels on the long side."""
    if size != 0 and not 16 <= size <= MAX_THUMBNAIL_SIZE:
        raise InvalidArgument(
            f"thumbnail_size must be 0 (no thumbnails) or 16..{MAX_THUMBNAIL_SIZE}, not {size}",
            "thumbnail_size")


def make_thumbnail(data: bytes, long_side: int, max_pixels: int) -> bytes:
    """The image scaled to fit `long_side` x `long_side` (never enlarged), as WebP bytes."""
    img = decode_image(data, max_pixels, draft_size=long_side)
    img.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="WEBP", quality=WEBP_QUALITY, method=2)  # 4 costs 25 % more, same size
    return out.getvalue()


def make_thumbnails(images: list[bytes], long_side: int, max_pixels: int) -> list[bytes | None]:
    """One thumbnail per image (None where the size is 0 or the image cannot be decoded)."""
    if long_side == 0:
        return [None] * len(images)
    out: list[bytes | None] = []
    for data in images:
        try:
            out.append(make_thumbnail(data, long_side, max_pixels))
        except InvalidArgument:
            out.append(None)  # the embedder reports the error; nothing is written for it
    return out
