"""Image inputs: paths, encoded bytes or PIL images, checked before any call starts."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from clipsearch.v1 import clipsearch_pb2 as pb

if TYPE_CHECKING:  # Pillow is optional: only type checkers look at it.
    from PIL.Image import Image as PILImage


# A path, encoded image bytes (JPEG, PNG, WebP, GIF, BMP, TIFF), or a PIL image.
ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview | PILImage"


def _is_pil_image(obj: object) -> bool:
    return type(obj).__module__.startswith("PIL.") and hasattr(obj, "save")


def _check_image(obj: object, index: int | None) -> object:
    """Validates one image input up front so that no call starts with a bad argument."""
    what = "the query image" if index is None else f"image {index}"
    if isinstance(obj, (bytes, bytearray, memoryview)):
        if len(obj) == 0:
            raise ValueError(f"{what} is empty")
        return obj
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no such file: {os.fspath(path)}")
        return path
    if _is_pil_image(obj):
        return obj
    raise TypeError(f"{what} must be a path, bytes or a PIL image, got {type(obj).__name__}")


def _load_image(obj: object) -> bytes:
    """The encoded bytes of a checked image: files as they are, PIL images as PNG."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, Path):
        return obj.read_bytes()
    buf = io.BytesIO()
    image: Any = obj
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    image.save(buf, format="PNG")
    return buf.getvalue()


def _query_image(image: object) -> bytes:
    return _load_image(_check_image(image, None))


def _image_setter(image: object) -> Callable[[pb.Item], None]:
    # Loaded when the item is built, so only the batch being assembled is in memory.
    def set_content(item: pb.Item) -> None:
        item.image = _load_image(image)

    return set_content
