"""Device JPEG decoding (nvjpeg on CUDA) against open_clip's own preprocessing.

Every test runs on the CPU (torchvision's libjpeg decoder feeding the same tensor steps, so CI
checks the logic) and, where torch sees a GPU, again on CUDA with nvjpeg. Stated tolerance, in
normalised units (a uint8 level is about 0.015), against open_clip's transform on Pillow's
full decode, over the coco128 photos: mean |diff| <= 0.01 overall and <= 0.02 for the worst
photo; each image's embedding has cosine >= 0.999 to the reference embedding.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipsearch import BatchError, Client
from clipsearch_server.catalog import bundled_config_dir
from clipsearch_server.config import parse_settings
from clipsearch_server.encoders.local.device_decode import (
    DeviceJpegDecoder,
    device_decoder,
    tensor_steps,
)
from clipsearch_server.encoders.local.preprocess import ImagePreprocessor
from clipsearch_server.errors import InvalidArgument
from conftest import TEST_DEVICE, TINY_MODEL, ServerProcess, coco_images

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ORIENTATION = 0x0112
MEAN_TOLERANCE = 0.01
WORST_IMAGE_TOLERANCE = 0.02


def _jpeg(img: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=95, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def reference():
    open_clip.add_model_config(bundled_config_dir())
    torch.manual_seed(0)
    model, _, transform = open_clip.create_model_and_transforms(TINY_MODEL)
    return model.eval(), transform


def _decoder(transform, device: str) -> DeviceJpegDecoder:
    decoder = device_decoder(transform, torch.device(device), 40_000_000, "on")
    assert decoder is not None
    return decoder


@pytest.mark.parametrize("device", DEVICES)
def test_coco128_within_the_stated_tolerance(reference, device: str) -> None:
    model, transform = reference
    decoder = _decoder(transform, device)
    host = ImagePreprocessor(transform, 40_000_000, None)
    datas = [f.read_bytes() for f in coco_images()]
    ours, refs = [], []
    for s in range(0, len(datas), 32):
        chunk = datas[s:s + 32]
        pixels, failed = decoder.decode([decoder.inspect(d) for d in chunk])
        assert failed == []
        ours.append(pixels.float().cpu())
        refs.append(torch.stack([host(d) for d in chunk]))
    got, want = torch.cat(ours), torch.cat(refs)
    per_image = (got - want).abs().mean(dim=(1, 2, 3))
    assert float(per_image.mean()) <= MEAN_TOLERANCE, float(per_image.mean())
    assert float(per_image.max()) <= WORST_IMAGE_TOLERANCE, float(per_image.max())
    with torch.inference_mode():
        a = model.encode_image(got, normalize=True)
        b = model.encode_image(want, normalize=True)
    assert float((a * b).sum(-1).min()) >= 0.999


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(reference, device: str, orientation: int) -> None:
    _, transform = reference
    # An asymmetric picture: a red block top-left, a blue one bottom-right, on a 3:2 canvas.
    img = Image.new("RGB", (300, 200), (250, 250, 250))
    img.paste((220, 20, 20), (0, 0, 80, 60))
    img.paste((20, 20, 220), (200, 120, 300, 200))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    data = _jpeg(img, exif=exif.tobytes())
    decoder = _decoder(transform, device)
    file = decoder.inspect(data)
    assert file is not None and file.orientation == orientation
    pixels, failed = decoder.decode([file])
    want = ImagePreprocessor(transform, 40_000_000, None)(data)
    assert failed == []
    assert float((pixels[0].float().cpu() - want).abs().mean()) < 0.02


@pytest.mark.parametrize("device", DEVICES)
def test_what_the_device_path_leaves_to_the_host(reference, device: str) -> None:
    _, transform = reference
    decoder = _decoder(transform, device)
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(png, "PNG")
    assert decoder.inspect(png.getvalue()) is None  # other formats
    assert decoder.inspect(_jpeg(Image.new("CMYK", (40, 30), (0, 50, 90, 10)))) is None
    with pytest.raises(InvalidArgument, match="over the limit"):
        DeviceJpegDecoder(decoder.steps, decoder.device, 100).inspect(
            _jpeg(Image.new("RGB", (40, 30))))
    with pytest.raises(InvalidArgument, match="empty"):
        decoder.inspect(b"")
    noise = np.random.default_rng(0).integers(0, 255, (192, 256, 3), dtype=np.uint8)
    good = _jpeg(Image.fromarray(noise))
    # A file cut off after its header: nvjpeg would decode it with grey filling the rest.
    assert decoder.inspect(good[: len(good) // 2]) is None
    # A file the decoder refuses fails the batched call; it is handed back by index and its
    # neighbours are still decoded. (Which real files nvjpeg refuses varies by version, so
    # the refusal is made to order here.)
    refused = decoder.inspect(_jpeg(Image.new("RGB", (64, 48), (1, 1, 1))))
    real = decoder._decode_many

    def picky(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        if any(d is refused.data for d in datas):
            raise RuntimeError("nvjpeg: bitstream not supported")
        return real(datas)

    decoder._decode_many = picky  # type: ignore[method-assign]
    pixels, failed = decoder.decode([decoder.inspect(good), refused, decoder.inspect(good)])
    assert failed == [1]
    assert pixels.shape[0] == 2


def test_transforms_other_than_resize_crop_normalise_stay_on_the_host() -> None:
    from torchvision import transforms as T

    squash = T.Compose([T.Resize((224, 224)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    assert tensor_steps(squash) is None
    augmenting = T.Compose([T.RandomResizedCrop(224), T.ToTensor()])
    assert tensor_steps(augmenting) is None
    assert device_decoder(squash, torch.device("cpu"), 1000, "auto") is None  # auto: CUDA only
    with pytest.raises(RuntimeError, match="cannot run here"):
        device_decoder(squash, torch.device("cpu"), 1000, "on")


def test_setting_is_validated() -> None:
    assert parse_settings(["--device-decode", "on"]).device_decode == "on"
    with pytest.raises(SystemExit):
        parse_settings(["--device-decode", "maybe"])


# --- through the server ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    root = tmp_path_factory.mktemp("device-decode")
    on = ServerProcess(tiny_checkpoint, root / "on", "--device-decode", "on",
                       "--no-jpeg-draft", "--max-batch-size", "8").start()
    off = ServerProcess(tiny_checkpoint, root / "off", "--device-decode", "off",
                        "--no-jpeg-draft").start()
    yield on, off
    for proc in (on, off):
        assert proc.stop() == 0, proc.log()


def test_server_embeds_like_the_host_path_with_per_item_errors(servers) -> None:
    on, off = servers
    files = coco_images(20)
    png = io.BytesIO()
    Image.open(files[0]).save(png, "PNG")
    cmyk = _jpeg(Image.open(files[1]).convert("CMYK"))
    images = [f.read_bytes() for f in files] + [png.getvalue(), cmyk, b"not an image",
                                                files[2].read_bytes()[:500]]
    results = []
    for proc in (on, off):
        with Client(proc.address) as client:
            with pytest.raises(BatchError) as info:
                client.embed_images(images)
            results.append(info.value)
    (got, want) = results
    failed = [e.index for e in got.errors]
    assert failed == [e.index for e in want.errors] == [len(images) - 2, len(images) - 1]
    assert [e.message for e in got.errors] == [e.message for e in want.errors]
    a, b = got.vectors, want.vectors
    ok = [i for i in range(len(images)) if i not in failed]
    assert float(np.min(np.sum(a[ok] * b[ok], axis=1))) >= 0.999
    with Client(on.address) as client:
        assert client.info().device == TEST_DEVICE
