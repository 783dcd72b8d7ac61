"""Image inputs: paths, encoded bytes or PIL images, checked before any call starts; and the
image files of a folder, found by their first bytes.

Neither needs Pillow: a PIL image is encoded through its own ``save`` method.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:  # Pillow is optional: only type checkers look at it.
    from PIL.Image import Image as PILImage


# A path, encoded image bytes (JPEG, PNG, WebP, GIF, BMP, TIFF), or a PIL image.
ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview | PILImage"


# --------------------------------------------------------------------------------------------
# Image inputs


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


def _check_images(images: Sequence[ImageInput]) -> list[object]:
    """Every image of a sequence checked (see _check_image); one image alone is a TypeError."""
    if isinstance(images, (str, bytes, os.PathLike)) or _is_pil_image(images):
        raise TypeError("images must be a sequence of images, not one image")
    return [_check_image(img, i) for i, img in enumerate(images)]


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


# --------------------------------------------------------------------------------------------
# Finding images in a folder (by content: the magic bytes of the formats the server accepts)

# Enough bytes to recognize every supported format (BMP needs its DIB header size at 14..18).
SNIFF_BYTES = 18
# Sizes of the DIB headers that BMP files use (core, info, v2, v3, OS/2 v2, v4, v5).
_BMP_DIB_SIZES = {12, 40, 52, 56, 64, 108, 124}
# ISO base media brands of HEIC/HEIF and AVIF files (the `ftyp` box at bytes 4..12).
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_JXL_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"


def sniff_image(head: bytes) -> str | None:
    """The image format that the first bytes of a file announce, or None.

    Magic bytes rather than extensions: a folder's names are not to be trusted, and the
    server accepts exactly these formats.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    # "BM" alone is too weak (any text may start with it): check the DIB header size too.
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "bmp"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "heif"
    if head[4:8] == b"ftyp" and head[8:12] in _AVIF_BRANDS:
        return "avif"
    if head.startswith((b"\xff\x0a", _JXL_CONTAINER)):
        return "jxl"
    return None


@dataclass
class Discovery:
    """What a folder holds: paths relative to it, in posix form, sorted."""

    images: list[str] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)
    # (relative path, why) for files and folders that could not be read.
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def discover_images(root: str | os.PathLike[str]) -> Discovery:
    """Walks ``root`` recursively and sorts its files into images and the rest.

    Symbolic links to folders are not followed (no loops); links to files are.
    """
    root = Path(root)
    found = Discovery()

    def on_error(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else root
        found.unreadable.append((_relative(where, root), exc.strerror or str(exc)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            rel = _relative(path, root)
            try:
                if not path.is_file():
                    continue  # sockets, fifos, broken links
                with path.open("rb") as f:
                    head = f.read(SNIFF_BYTES)
            except OSError as exc:
                found.unreadable.append((rel, exc.strerror or str(exc)))
                continue
            (found.images if sniff_image(head) else found.not_images).append(rel)
    found.images.sort()
    found.not_images.sort()
    found.unreadable.sort()
    return found


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
