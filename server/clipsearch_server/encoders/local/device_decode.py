"""JPEG bytes -> model input on the model's device: nvjpeg decoding, resize and crop on the GPU.

On a GPU the image tower embeds thousands of images per second, far more than Pillow can
decode and resize on the host's cores. This path hands a batch of JPEG files to
torchvision's nvjpeg decoder in one call and runs open_clip's own Resize, CenterCrop and
Normalize (torchvision transforms, which accept tensors) on the decoded batch, on the GPU.

The host still parses each header with Pillow first, so the format whitelist, the pixel
budget (decompression-bomb guard) and the EXIF orientation behave exactly as on the CPU path.
Anything this path does not cover (other formats, CMYK or 12-bit JPEGs, a file nvjpeg
refuses) goes back to the CPU path, which decodes it or reports the precise error. The result
differs from open_clip's reference preprocessing only by decoder and resampling rounding;
tests/e2e/test_device_decode.py states and checks the tolerance.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from ...images import open_checked

log = logging.getLogger(__name__)

_JPEG_FORMATS = ("JPEG", "MPO")
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class TensorSteps:
    """open_clip's preprocessing, as the tensor-capable torchvision steps it is made of."""

    resize: torch.nn.Module
    crop: torch.nn.Module
    normalize: torch.nn.Module


def tensor_steps(transform: Callable) -> TensorSteps | None:
    """Resize, CenterCrop and Normalize from an open_clip transform, or None if it has others.

    open_clip's default (`resize_mode="shortest"`) transform is Resize, CenterCrop, a mode
    conversion, ToTensor and Normalize; the middle two are what tensors skip. Any other shape
    (squash or longest resizing, augmentation) keeps the CPU path.
    """
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", None)
    if not steps:
        return None
    resize = crop = normalize = None
    for step in steps:
        kind = type(step).__name__
        if isinstance(step, T.Resize) and resize is None and crop is None:
            resize = step
        elif isinstance(step, T.CenterCrop) and resize is not None and crop is None:
            crop = step
        elif isinstance(step, T.Normalize) and crop is not None:
            normalize = step
        elif kind in ("MaybeConvertMode", "MaybeToTensor", "ToTensor") or (
                kind == "function" or getattr(step, "__name__", "") == "_convert_to_rgb"):
            continue
        else:
            return None
    if resize is None or crop is None or normalize is None:
        return None
    return TensorSteps(resize, crop, normalize)


@dataclass(frozen=True)
class JpegFile:
    """A JPEG whose header passed the host-side checks, ready for the batched decoder."""

    data: torch.Tensor  # the file's bytes, uint8, on the host
    orientation: int  # EXIF orientation tag, 1 = upright


class DeviceJpegDecoder:
    """Batched JPEG decoding and open_clip's preprocessing on one torch device."""

    def __init__(self, steps: TensorSteps, device: torch.device, max_pixels: int) -> None:
        from torchvision.io import ImageReadMode

        self.steps = steps
        self.device = device
        self.max_pixels = max_pixels
        self._rgb = ImageReadMode.RGB

    def inspect(self, data: bytes) -> JpegFile | None:
        """Header checks on the host: a JpegFile for this path, None for the CPU path.

        Raises InvalidArgument exactly where the CPU path would before decoding (empty,
        unknown format, corrupt header, over the pixel budget).
        """
        img = open_checked(data, self.max_pixels)
        if img.format not in _JPEG_FORMATS or img.mode not in ("RGB", "L"):
            return None  # CMYK, 12-bit and other formats: Pillow does them right
        if not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
            # No end-of-image marker: nvjpeg would fill a cut-off file with grey where
            # Pillow refuses it, so the host path decides (and names the fault).
            return None
        try:
            orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
        except Exception:  # a broken EXIF block: the picture as stored, as on the CPU path
            orientation = 1
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return JpegFile(buffer, orientation if 1 <= orientation <= 8 else 1)

    @torch.inference_mode()
    def decode(self, files: list[JpegFile]) -> tuple[torch.Tensor, list[int]]:
        """Preprocess a batch: (N_ok x 3 x S x S float tensor on the device, failed indices).

        nvjpeg decodes the whole list in one call and fails it whole, so after a failure the
        files are retried one by one to find which ones to hand back to the CPU path.
        """
        if not files:
            raise ValueError("no files to decode")
        try:
            images = self._decode_many([f.data for f in files])
            ok = list(range(len(files)))
        except RuntimeError:
            images, ok = [], []
            for i, f in enumerate(files):
                try:
                    images.extend(self._decode_many([f.data]))
                    ok.append(i)
                except RuntimeError as exc:
                    log.debug("device JPEG decode failed, using the CPU path: %s", exc)
        failed = sorted(set(range(len(files))) - set(ok))
        if not ok:
            return torch.empty(0), failed
        upright = [_orient(img, files[i].orientation) for img, i in zip(images, ok, strict=True)]
        return self._preprocess(upright), failed

    def _decode_many(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated
            out = decode_jpeg(datas, mode=self._rgb, device=self.device)
        return list(out)

    def _preprocess(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Resize and crop each size group as one batch, then normalise all together."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault((img.shape[-2], img.shape[-1]), []).append(i)
        crops: list[torch.Tensor | None] = [None] * len(images)
        for rows in groups.values():
            batch = torch.stack([images[i] for i in rows])
            out = self.steps.crop(self.steps.resize(batch))  # uint8 in, uint8 out, like PIL
            for j, i in enumerate(rows):
                crops[i] = out[j]
        pixels = torch.stack(crops).float().div_(255.0)  # type: ignore[arg-type]
        return self.steps.normalize(pixels)


def _orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a C x H x W tensor, as Pillow's exif_transpose does."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return img.rot90(-1, (-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return img.rot90(1, (-2, -1))
    return img


def device_decoder(transform: Callable, device: torch.device, max_pixels: int,
                   mode: str) -> DeviceJpegDecoder | None:
    """The decoder for `--device-decode` (auto: on CUDA when torchvision has nvjpeg), or None."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    why_not = None
    steps = None
    try:
        steps = tensor_steps(transform)
        if steps is None:
            why_not = "the model's preprocessing is not Resize, CenterCrop, Normalize"
        else:
            decoder = DeviceJpegDecoder(steps, device, max_pixels)
            decoder.decode([decoder.inspect(_probe_jpeg())])  # type: ignore[list-item]
            return decoder
    except Exception as exc:  # no torchvision, or no nvjpeg in this build
        why_not = f"{type(exc).__name__}: {exc}"
    if mode == "on":
        raise RuntimeError(f"--device-decode on, but it cannot run here: {why_not}")
    log.warning("decoding JPEGs on the CPU: device decoding is unavailable (%s)", why_not)
    return None


def _probe_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()
