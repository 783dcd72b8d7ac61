"""The photo formats phones make: HEIC/HEIF, AVIF and JPEG XL decode like any other image.

Every sample is made here with the encoder libraries themselves (pillow-heif, Pillow's AVIF
plugin, pillow-jxl-plugin), in several colour modes and sizes and with an EXIF orientation
tag. Each must decode to the same upright picture as the same pixels saved as PNG, embed
through a real server like that PNG (cosine >= 0.99), and a truncated file of each format must
be refused for that item only. Motion photos and Ultra HDR JPEGs embed their still image.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image, ImageOps

from clipsearch import BatchError, Client
from clipsearch_server.errors import InvalidArgument
from clipsearch_server.formats import ACCEPTED_FORMATS
from clipsearch_server.images import decode_image
from conftest import coco_images

LIMIT = 40_000_000
ORIENTATION = 0x0112
# Pillow format name and encoder options: high quality lossy, full-resolution colour.
PHONE_FORMATS = {"HEIF": {"quality": 95, "chroma": 444},
                 "AVIF": {"quality": 95, "subsampling": "4:4:4"},
                 "JXL": {"quality": 95}}
# Mean absolute difference (0..255) allowed between a lossy decode and the PNG of the same
# pixels: measured up to 5.7 (JPEG XL, 64x48); a mirrored picture or swapped channels is off by
# 65 or more on these photos.
PIXEL_TOLERANCE = 8.0


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def photo(size: tuple[int, int]) -> Image.Image:
    """A real photo (coco128), cut to `size`: content a lossy encoder treats as it would a
    phone picture."""
    with Image.open(coco_images(1)[0]) as src:
        return ImageOps.fit(src.convert("RGB"), size)


def difference(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size, (a.size, b.size)
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def test_the_phone_formats_are_accepted() -> None:
    assert set(PHONE_FORMATS) <= set(ACCEPTED_FORMATS)


@pytest.mark.parametrize("fmt", PHONE_FORMATS)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
@pytest.mark.parametrize("size", [(64, 48), (317, 203), (1024, 768)])
def test_decodes_like_the_same_pixels_as_png(fmt: str, mode: str, size: tuple[int, int]
                                             ) -> None:
    img = photo(size).convert(mode)
    if "A" in mode:  # a transparent corner: it must turn white as in a PNG
        alpha = img.getchannel("A")
        alpha.paste(0, (0, 0, size[0] // 4, size[1] // 4))
        img.putalpha(alpha)
    got = decode_image(encode(img, fmt, **PHONE_FORMATS[fmt]), LIMIT)
    want = decode_image(encode(img, "PNG"), LIMIT)
    assert got.mode == "RGB"
    assert difference(got, want) < PIXEL_TOLERANCE


# Pillow's AVIF encoder writes 8 bits only (it clips a 16-bit picture while saving), so no
# high-bit-depth AVIF sample can be made here; HEIF and JPEG XL keep the extra bits.
@pytest.mark.parametrize("fmt", ["HEIF", "JXL"])
def test_sixteen_bit_greyscale_is_scaled_not_clipped(fmt: str) -> None:
    grey = np.asarray(photo((96, 64)).convert("L"), np.uint16) * 257  # full 16-bit range
    img = Image.fromarray(grey)  # mode I;16
    got = decode_image(encode(img, fmt, **PHONE_FORMATS[fmt]), LIMIT)
    want = decode_image(encode(img, "PNG"), LIMIT)
    assert difference(got, want) < PIXEL_TOLERANCE


@pytest.mark.parametrize("fmt", PHONE_FORMATS)
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(fmt: str, orientation: int) -> None:
    img = photo((120, 64))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    got = decode_image(encode(img, fmt, exif=exif.tobytes(), **PHONE_FORMATS[fmt]), LIMIT)
    upright = decode_image(encode(img, "PNG", exif=exif.tobytes()), LIMIT)
    assert upright.size == ((64, 120) if orientation in (6, 8) else (120, 64))
    assert difference(got, upright) < PIXEL_TOLERANCE


@pytest.mark.parametrize("fmt", PHONE_FORMATS)
def test_pixel_budget_is_checked_before_decoding(fmt: str) -> None:
    data = encode(photo((200, 100)), fmt, **PHONE_FORMATS[fmt])
    with pytest.raises(InvalidArgument, match="over the limit of 19999"):
        decode_image(data, 19_999)


@pytest.mark.parametrize("fmt", PHONE_FORMATS)
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_files_are_refused(fmt: str, keep: float) -> None:
    data = encode(photo((320, 240)), fmt, **PHONE_FORMATS[fmt])
    with pytest.raises(InvalidArgument):
        decode_image(data[: int(len(data) * keep)], LIMIT)


def test_motion_photo_decodes_as_its_still() -> None:
    """A motion photo is a JPEG with the video appended after the JPEG's end marker."""
    still = encode(photo((160, 120)), "JPEG", quality=95)
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64
    assert difference(decode_image(still + video, LIMIT), decode_image(still, LIMIT)) == 0


def test_ultra_hdr_jpeg_decodes_as_its_still() -> None:
    """An Ultra HDR JPEG carries its gain map as a second (MPF) picture after the still."""
    img = photo((160, 120))
    gain_map = Image.new("L", (80, 60), 128).convert("RGB")
    data = encode(img, "MPO", save_all=True, append_images=[gain_map], quality=95)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    got = decode_image(data, LIMIT)
    want = decode_image(encode(img, "JPEG", quality=95), LIMIT)
    assert difference(got, want) < 1.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_each_format_embeds_like_the_png_through_the_server(client: Client) -> None:
    samples = []
    for size in ((640, 480), (300, 400)):
        img = photo(size)
        exif = Image.Exif()
        exif[ORIENTATION] = 6
        samples.append((img, {}))
        samples.append((img, {"exif": exif.tobytes()}))
    images: list[bytes] = []
    for img, extra in samples:
        images.append(encode(img, "PNG", **extra))
        images += [encode(img, fmt, **PHONE_FORMATS[fmt], **extra) for fmt in PHONE_FORMATS]
    vectors = client.embed_images(images)
    step = 1 + len(PHONE_FORMATS)
    for start in range(0, len(images), step):
        png = vectors[start]
        for offset, fmt in enumerate(PHONE_FORMATS, 1):
            assert cosine(vectors[start + offset], png) >= 0.99, (fmt, start)


def test_a_truncated_file_fails_only_its_own_item(client: Client) -> None:
    img = photo((320, 240))
    whole = [encode(img, fmt, **PHONE_FORMATS[fmt]) for fmt in PHONE_FORMATS]
    cut = [data[: len(data) * 2 // 3] for data in whole]
    with pytest.raises(BatchError) as err:
        client.embed_images(whole + cut)
    failed = {e.index: e for e in err.value.errors}
    assert sorted(failed) == list(range(len(whole), 2 * len(whole)))
    assert all(e.code == grpc.StatusCode.INVALID_ARGUMENT for e in failed.values())
    vectors = err.value.vectors
    assert vectors is not None
    assert np.isfinite(vectors[: len(whole)]).all()
