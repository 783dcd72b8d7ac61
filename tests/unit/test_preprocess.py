"""decode_image and ImagePreprocessor: formats, orientation, colour modes and hostile input.

Every input is built in memory with Pillow (or cut from a real coco photo), so each test
states exactly what it feeds the decoder and what a person would expect to see.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipsearch_server.catalog import bundled_config_dir
from clipsearch_server.encoders.local.preprocess import DRAFT_OVERSAMPLE, ImagePreprocessor
from clipsearch_server.errors import InvalidArgument
from clipsearch_server.images import decode_image
from conftest import TINY_MODEL, coco_images

LIMIT = 40_000_000
RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
ORIENTATION = 0x0112


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def decode(data: bytes, max_pixels: int = LIMIT) -> Image.Image:
    img = decode_image(data, max_pixels)
    assert img.mode == "RGB"
    return img


def close(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


def upright_rgb_photo(limit: int = 24) -> Path:
    for path in coco_images(limit):
        with Image.open(path) as img:
            if img.mode == "RGB" and img.getexif().get(ORIENTATION, 1) == 1:
                return path
    pytest.skip("no upright RGB photo among the coco images")


# --- orientation ----------------------------------------------------------------------------


def _marked_jpeg(orientation: int) -> bytes:
    """An 80x40 (landscape, as stored) grey JPEG whose top-left quadrant is red."""
    img = Image.new("RGB", (80, 40), (128, 128, 128))
    img.paste(RED, (0, 0, 40, 20))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize(
    ("orientation", "red_quadrant"),
    [
        (1, "top-left"),  # as stored
        (3, "bottom-right"),  # rotated 180 degrees
        (6, "top-right"),  # view = stored turned 90 degrees clockwise
        (8, "bottom-left"),  # view = stored turned 90 degrees counter-clockwise
    ],
)
def test_exif_orientation_is_applied(orientation: int, red_quadrant: str) -> None:
    img = decode(_marked_jpeg(orientation))
    assert img.size == ((80, 40) if orientation in (1, 3) else (40, 80))
    w, h = img.size
    centres = {
        "top-left": (w // 4, h // 4),
        "top-right": (3 * w // 4, h // 4),
        "bottom-left": (w // 4, 3 * h // 4),
        "bottom-right": (3 * w // 4, 3 * h // 4),
    }
    red = {name for name, xy in centres.items() if close(img.getpixel(xy), RED, tol=40)}
    assert red == {red_quadrant}


def test_broken_exif_still_decodes() -> None:
    img = Image.new("RGB", (16, 8), RED)
    data = encode(img, "JPEG", exif=b"Exif\x00\x00garbage-not-tiff")
    assert decode(data).size == (16, 8)


# --- colour modes ---------------------------------------------------------------------------


def test_palette_png_with_transparency_becomes_white() -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * (256 - 2) * 3)
    img.paste(1, (0, 0, 4, 8))
    out = decode(encode(img, "PNG", transparency=0))
    assert out.getpixel((1, 1)) == RED
    assert out.getpixel((6, 6)) == WHITE  # palette index 0 is black but transparent


def test_rgba_transparent_area_becomes_white() -> None:
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparent black
    img.paste((0, 0, 255, 255), (0, 0, 4, 8))
    img.paste((255, 0, 0, 128), (4, 0, 8, 4))  # half-transparent red over white: pink
    out = decode(encode(img, "PNG"))
    assert out.getpixel((1, 1)) == BLUE
    assert out.getpixel((6, 6)) == WHITE
    assert close(out.getpixel((6, 1)), (255, 127, 127), tol=2)


def test_la_mode_transparent_area_becomes_white() -> None:
    img = Image.new("LA", (8, 8), (0, 0))
    img.paste((60, 255), (0, 0, 4, 8))
    source = Image.open(io.BytesIO(encode(img, "PNG")))
    assert source.mode == "LA"
    out = decode(encode(img, "PNG"))
    assert out.getpixel((1, 1)) == (60, 60, 60)
    assert out.getpixel((6, 6)) == WHITE


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_colour_key_transparency_becomes_white(mode: str) -> None:
    img = Image.new(mode, (8, 8), 0)
    img.paste(200 if mode == "L" else (200, 0, 0), (0, 0, 4, 8))
    key = 0 if mode == "L" else (0, 0, 0)
    out = decode(encode(img, "PNG", transparency=key))
    assert out.getpixel((6, 6)) == WHITE


def test_cmyk_jpeg_has_sensible_colour() -> None:
    img = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan ink
    img.paste((0, 255, 0, 0), (8, 0, 16, 16))  # pure magenta ink
    data = encode(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode(data)
    r, g, b = out.getpixel((2, 8))
    assert r < 40 and g > 215 and b > 215
    r, g, b = out.getpixel((13, 8))
    assert r > 215 and g < 40 and b > 215


def test_greyscale_l_and_bilevel() -> None:
    grey = Image.new("L", (8, 8), 77)
    assert decode(encode(grey, "PNG")).getpixel((3, 3)) == (77, 77, 77)
    bilevel = Image.new("1", (8, 8), 0)
    bilevel.paste(1, (0, 0, 4, 8))
    source = Image.open(io.BytesIO(encode(bilevel, "PNG")))
    assert source.mode == "1"
    out = decode(encode(bilevel, "PNG"))
    assert out.getpixel((1, 1)) == WHITE
    assert out.getpixel((6, 1)) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_greyscale_is_scaled_not_clipped(fmt: str) -> None:
    values = np.array([[0, 32768, 65535, 16384]], dtype=np.uint16).repeat(4, axis=0)
    data = encode(Image.fromarray(values), fmt)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I;16B", "I")
    out = np.asarray(decode(data))
    assert out.shape == (4, 4, 3)
    row = out[0, :, 0]
    assert abs(int(row[0]) - 0) <= 1
    assert abs(int(row[1]) - 128) <= 1  # clipping would make mid-grey 255
    assert int(row[2]) >= 254
    assert abs(int(row[3]) - 64) <= 1


def test_thirty_two_bit_integer_greyscale() -> None:
    values = np.full((4, 4), 32768, dtype=np.int32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert close(decode(data).getpixel((1, 1)), (128, 128, 128), tol=1)


def test_float_greyscale_in_unit_range() -> None:
    values = np.full((4, 4), 0.5, dtype=np.float32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert close(decode(data).getpixel((1, 1)), (127, 127, 127), tol=1)


# --- formats --------------------------------------------------------------------------------


def _two_tone(size: tuple[int, int] = (24, 16)) -> Image.Image:
    img = Image.new("RGB", size, BLUE)
    img.paste(RED, (0, 0, size[0] // 2, size[1]))
    return img


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("WEBP", {"lossless": True}),
        ("WEBP", {"quality": 90}),
        ("BMP", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("PNG", {}),
        ("JPEG", {"quality": 95}),
        ("GIF", {}),
    ],
)
def test_accepted_formats_decode(fmt: str, kwargs: dict[str, object]) -> None:
    out = decode(encode(_two_tone(), fmt, **kwargs))
    assert out.size == (24, 16)
    assert close(out.getpixel((3, 8)), RED, tol=30)
    assert close(out.getpixel((20, 8)), BLUE, tol=30)


def test_animated_gif_uses_first_frame() -> None:
    red = Image.new("RGB", (12, 12), RED)
    blue = Image.new("RGB", (12, 12), BLUE)
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert decode(data).getpixel((6, 6)) == RED


def test_animated_webp_uses_first_frame() -> None:
    red = Image.new("RGB", (12, 12), RED)
    blue = Image.new("RGB", (12, 12), BLUE)
    data = encode(red, "WEBP", save_all=True, append_images=[blue], lossless=True)
    assert close(decode(data).getpixel((6, 6)), RED, tol=2)


def test_real_photo_decodes_unchanged() -> None:
    path = upright_rgb_photo()
    out = decode(path.read_bytes())
    with Image.open(path) as ref:
        assert out.size == ref.size
        assert np.array_equal(np.asarray(out), np.asarray(ref.convert("RGB")))


def test_real_greyscale_photo_becomes_rgb() -> None:
    grey = [p for p in coco_images() if Image.open(p).mode == "L"]
    if not grey:
        pytest.skip("no greyscale photo among the coco images")
    out = np.asarray(decode(grey[0].read_bytes()))
    assert out.ndim == 3 and out.shape[2] == 3
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


# --- hostile and wrong input ----------------------------------------------------------------


def _png_header_only_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of all-black rows: a few hundred KB that would decode to `w*h` pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    block = row * 1000
    parts = [comp.compress(block) for _ in range(height // 1000)]
    parts.append(comp.compress(row * (height % 1000)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb_30k() -> bytes:
    return _png_header_only_bomb(30_000, 30_000)


def test_decompression_bomb_is_refused_from_the_header(bomb_30k: bytes) -> None:
    assert len(bomb_30k) < 2_000_000
    started = time.perf_counter()
    with pytest.raises(InvalidArgument, match="limit") as info:
        decode_image(bomb_30k, LIMIT)
    assert time.perf_counter() - started < 0.5  # no full decode of 900 M pixels
    assert "decompression" in str(info.value)


def test_image_over_our_pixel_budget_names_the_budget() -> None:
    # 10000x10000 is under Pillow's own hard limit, so this is our check speaking.
    data = _png_header_only_bomb(10_000, 10_000)
    started = time.perf_counter()
    with pytest.raises(InvalidArgument) as info:
        decode_image(data, LIMIT)
    assert time.perf_counter() - started < 0.5
    message = str(info.value)
    assert "10000x10000" in message and str(LIMIT) in message


def test_pixel_budget_boundary() -> None:
    data = encode(Image.new("RGB", (10, 10), RED), "PNG")
    assert decode(data, max_pixels=100).size == (10, 10)
    with pytest.raises(InvalidArgument, match="over the limit of 99"):
        decode_image(data, 99)


def test_truncated_jpeg_is_invalid_argument() -> None:
    data = upright_rgb_photo().read_bytes()
    with pytest.raises(InvalidArgument, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], LIMIT)


def test_truncated_png_is_invalid_argument() -> None:
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(InvalidArgument):
        decode_image(data[: len(data) // 2], LIMIT)


SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
       b'<rect width="10" height="10" fill="red"/></svg>')


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(np.random.default_rng(7).bytes(4096), id="random-bytes"),
        pytest.param(b"a photo of a dog\nnot an image at all\n" * 20, id="text"),
        pytest.param(SVG, id="svg"),
        pytest.param(b"\x89PNG\r\n\x1a\n", id="png-magic-only"),
        pytest.param(b"\xff\xd8\xff", id="jpeg-magic-only"),
    ],
)
def test_non_images_are_invalid_argument(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        decode_image(data, LIMIT)


@pytest.mark.parametrize("fmt", ["PCX", "TGA", "ICO", "PPM", "JPEG2000", "QOI"])
def test_formats_pillow_knows_but_we_refuse(fmt: str) -> None:
    Image.init()
    if fmt not in Image.SAVE:
        pytest.skip(f"this Pillow cannot write {fmt}")
    data = encode(_two_tone((32, 32)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # a real, valid image of that format
    with pytest.raises(InvalidArgument, match="accepted formats"):
        decode_image(data, LIMIT)


# --- ImagePreprocessor ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_transform():
    open_clip.add_model_config(bundled_config_dir())
    _, _, transform = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=None)
    return transform


def test_preprocessor_output_shape(tiny_transform) -> None:
    pre = ImagePreprocessor(tiny_transform, LIMIT)
    for data in (encode(_two_tone((300, 100)), "PNG"), _marked_jpeg(6),
                 encode(Image.new("LA", (50, 70), (9, 0)), "PNG")):
        pixels = pre(data)
        assert isinstance(pixels, torch.Tensor)
        assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
        assert torch.isfinite(pixels).all()


def test_preprocessor_matches_open_clip_on_real_photos(tiny_transform) -> None:
    pre = ImagePreprocessor(tiny_transform, LIMIT)
    paths = [p for p in coco_images(12) if Image.open(p).getexif().get(ORIENTATION, 1) == 1][:4]
    assert paths
    for path in paths:
        with Image.open(path) as img:
            expected = tiny_transform(img)
        assert torch.equal(pre(path.read_bytes()), expected), path


def test_preprocessor_propagates_invalid_argument(tiny_transform) -> None:
    pre = ImagePreprocessor(tiny_transform, max_pixels=10)
    with pytest.raises(InvalidArgument, match="over the limit"):
        pre(encode(Image.new("RGB", (4, 4)), "PNG"))


def test_jpeg_draft_decoding_stays_within_the_stated_tolerance(tiny_transform) -> None:
    """Tolerance of the fast path on real photos: mean |difference| 0.03 over all of them,
    0.25 for the worst single photo (normalised units, where the pixel std is 1)."""
    draft = 64 * DRAFT_OVERSAMPLE  # the tiny model's input is 64 px
    exact = ImagePreprocessor(tiny_transform, LIMIT)
    fast = ImagePreprocessor(tiny_transform, LIMIT, draft_size=draft)
    diffs, reduced = [], 0
    for path in coco_images():
        data = path.read_bytes()
        full_size = decode(data).size
        drafted = decode_image(data, LIMIT, draft)
        assert min(drafted.size) >= draft
        reduced += drafted.size[0] < full_size[0]
        diffs.append(float((fast(data) - exact(data)).abs().mean()))
    assert reduced > len(diffs) // 2  # the fast path really ran on most photos
    assert np.mean(diffs) <= 0.03
    assert max(diffs) <= 0.25


def test_small_jpegs_and_other_formats_are_decoded_in_full() -> None:
    photo = upright_rgb_photo().read_bytes()
    assert decode_image(photo, LIMIT, draft_size=400).size == decode(photo).size
    png = encode(Image.new("RGB", (1200, 900), (10, 200, 30)), "PNG")
    assert decode_image(png, LIMIT, draft_size=64).size == (1200, 900)
