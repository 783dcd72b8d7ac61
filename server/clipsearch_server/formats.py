"""The image formats the server decodes, including the ones phones make.

Pillow decodes JPEG, PNG, WebP, GIF, BMP and TIFF itself, and AVIF (Android's newer default)
from 11.3 on. HEIC/HEIF (the iPhone's default) comes from the pillow-heif plugin and JPEG XL
from pillow-jxl-plugin; both register themselves as Pillow formats, so the header check, pixel
budget, EXIF orientation and colour handling in images.py apply to them unchanged.

Motion photos (a still JPEG or HEIC followed by a video) and Ultra HDR JPEGs (a still JPEG
plus a gain map as a second MPF picture) decode as their still image: Pillow stops at the
still's end, and the first frame is the one used.
"""

from __future__ import annotations

import logging

from PIL import Image

log = logging.getLogger(__name__)

# Pillow format name -> how a person calls it, in the order error messages list them.
KNOWN_FORMATS = {
    "JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP",
    "TIFF": "TIFF", "HEIF": "HEIC/HEIF", "AVIF": "AVIF", "JXL": "JPEG XL",
}


def _register_plugins() -> None:
    """Register the optional decoders that are installed; a missing one is logged, not fatal."""
    try:
        import pillow_heif

        # Keep HDR (10/12-bit) pictures as 8-bit RGB, the same as an SDR photo, and apply the
        # file's rotation and mirroring as the camera meant them.
        pillow_heif.options.CONVERT_HDR_TO_8BIT = True
        pillow_heif.register_heif_opener()
    except ImportError:
        log.debug("pillow-heif is not installed: HEIC/HEIF images are refused")
    try:
        import pillow_jxl  # noqa: F401 - importing it registers the JPEG XL format
    except ImportError:
        log.debug("pillow-jxl-plugin is not installed: JPEG XL images are refused")


_register_plugins()
Image.init()
# The formats this process can decode (Pillow versions differ, e.g. on MPO and AVIF).
ACCEPTED_FORMATS = tuple(f for f in KNOWN_FORMATS if f in Image.OPEN)


def accepted_names() -> str:
    """The accepted formats as a person reads them: 'JPEG, PNG, ... and JPEG XL'."""
    names = list(dict.fromkeys(KNOWN_FORMATS[f] for f in ACCEPTED_FORMATS))
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)
