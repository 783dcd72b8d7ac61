"""Which library runs the towers, torch or ONNX Runtime, and loading them.

`--backend auto` picks, from what the hardware does and from measurements (bench/RESULTS.md,
"Speed III"), the fastest backend whose vectors stay within the tested tolerance of fp32:

* a GPU: torch (bf16 or fp16, precision.py);
* a CPU with native bf16 (avx512_bf16, amx_bf16, Arm bf16): torch bf16, measured 1.7x ONNX
  Runtime fp32 on Zen 4;
* any other CPU: ONNX Runtime fp32, measured about 2x torch fp32 with cosine 0.9999999 to it.

An explicit `--precision fp32` keeps torch, open_clip's own computation, for exact parity.

int8 (ONNX Runtime's dynamic quantisation) is never chosen by auto: it is an opt-in
(`--precision int8`) whose tolerance is looser than the other precisions' (README).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from ...errors import ModelLoadError
from ...settings import AnySettings
from ..base import ModelInfo
from .model import ClipModel, load_model, resolve_device
from .precision import native_cpu_bf16

log = logging.getLogger(__name__)

ONNX_FOLDER = "onnx"  # under the data dir: the exported graphs, keyed by model fingerprint


class Towers(Protocol):
    """What the embedder needs of a loaded model, whichever backend runs it."""

    dim: int
    image_size: int
    device: torch.device
    pausable: bool  # encode_images takes `between=` and calls it between blocks
    transform: Callable[[Image.Image], torch.Tensor] | None

    def encode_texts(self, texts: list[str]) -> np.ndarray: ...

    def encode_images(self, pixels: torch.Tensor,
                      between: Callable[[], None] | None = None) -> np.ndarray: ...


def onnx_available() -> bool:
    return (importlib.util.find_spec("onnxruntime") is not None
            and importlib.util.find_spec("onnx") is not None)


def choose_backend(backend: str, precision: str, device: torch.device,
                   detect_cpu_bf16: Callable[[], str | None] = native_cpu_bf16
                   ) -> tuple[str, str]:
    """(backend, reason): "torch" or "onnx", and why, for the log and GetServerInfo."""
    if backend != "auto":
        return backend, f"--backend {backend} was asked for"
    if device.type != "cpu":
        return "torch", f"auto: torch on {device.type}"
    if precision == "int8":
        return "onnx", "auto: --precision int8 runs on ONNX Runtime"
    if precision in ("bf16", "fp16", "fp32"):
        return "torch", f"auto: --precision {precision} runs on torch (fp32: open_clip's own)"
    if precision == "auto" and (flag := detect_cpu_bf16()):
        return "torch", (f"auto: the CPU computes bf16 natively ({flag}); torch bf16 measured "
                         "1.7x ONNX Runtime fp32")
    if not onnx_available():
        return "torch", "auto: onnxruntime is not installed, so torch fp32"
    return "onnx", ("auto: no native bf16 on this CPU; ONNX Runtime fp32 measured about 2x "
                    "torch fp32, same vectors")


def model_info(model: ClipModel, backend: str = "torch", backend_reason: str = "",
               precision: str | None = None, precision_reason: str | None = None) -> ModelInfo:
    """What a loaded model tells the service about itself."""
    return ModelInfo(
        name=model.name, pretrained=model.pretrained,
        checkpoint=str(model.checkpoint) if model.checkpoint else None,
        random_weights=model.random_weights, device=str(model.device),
        precision=precision or model.precision,
        precision_reason=precision_reason or model.precision_reason, dim=model.dim,
        image_size=model.image_size, fingerprint=model.fingerprint,
        logit_scale=float(model.module.logit_scale.detach().exp().item()),
        load_seconds=model.load_seconds, backend=backend, backend_reason=backend_reason)


def load_towers(settings: AnySettings) -> tuple[Towers, ModelInfo]:
    """The towers `--backend` and `--precision` ask for, loaded (blocking; ModelLoadError)."""
    device = resolve_device(settings.device)
    backend, reason = choose_backend(settings.backend, settings.precision, device)
    if backend == "torch":
        model = load_model(settings)
        return model, model_info(model, "torch", reason)
    if device.type != "cpu":
        raise ModelLoadError(f"--backend onnx runs on the CPU, not {device}; use --device cpu")
    if not onnx_available():
        raise ModelLoadError("--backend onnx needs onnxruntime and onnx: pip install "
                             "'clipsearch[server]' brings them")
    model = load_model(settings, precision="fp32")  # the export starts from fp32
    precision = "int8" if settings.precision == "int8" else "fp32"
    precision_reason = (f"--precision {settings.precision} was asked for"
                        if settings.precision != "auto" else "auto: fp32 on ONNX Runtime")
    from .onnx_towers import OnnxTowers  # onnxruntime loads only when it is used

    try:
        towers = OnnxTowers.from_model(model, settings.data_dir / ONNX_FOLDER, precision)
    except Exception as exc:
        if settings.backend != "auto":
            raise ModelLoadError(f"could not build the ONNX Runtime towers: {exc}") from exc
        log.warning("ONNX Runtime towers unavailable (%s); running torch", exc)
        return model, model_info(model, "torch", f"auto: the ONNX export failed ({exc})")
    log.info("ONNX Runtime %s graphs from %s", precision, towers.folder)
    return towers, model_info(model, "onnxruntime", reason, precision, precision_reason)
