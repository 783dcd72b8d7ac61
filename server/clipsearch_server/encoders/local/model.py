"""open_clip loading and the two towers' forward passes.

open_clip's factory is the reference: the model and its preprocessing transform come from
`create_model_and_transforms`, so an embedding here equals open_clip's own `encode_image` /
`encode_text` output, normalised. Weights come from exactly one of: a pretrained tag
(downloaded by open_clip), a local checkpoint file, or a seeded random init for trying the API.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from ...catalog import bundled_config_dir
from ...errors import ModelLoadError
from ...settings import AnySettings
from .precision import choose_precision
from .preflight import WeightsUnavailable, check_weights_reachable

log = logging.getLogger(__name__)

RANDOM_SEED = 0
_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ClipModel:
    """A loaded CLIP model: both towers on one device, with their preprocessing."""

    name: str
    pretrained: str | None
    checkpoint: Path | None
    random_weights: bool
    device: torch.device
    precision: str
    dim: int
    image_size: int
    fingerprint: str
    module: torch.nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    load_seconds: float = 0.0
    trim_text: bool = True
    channels_last: bool = False
    compiled: bool = False
    precision_reason: str = ""  # why this precision (auto's choice, or asked for)

    def __post_init__(self) -> None:
        self._image_forward: Callable[[torch.Tensor], torch.Tensor] = self.module.encode_image
        self._text_forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        # Called between the image tower's residual blocks during encode_images(between=...).
        self._between: Callable[[], None] | None = None
        self.pausable = _hook_image_blocks(self.module, self._call_between)

    def _call_between(self, *_: object) -> None:
        if self._between is not None:
            self._between()

    @property
    def dtype(self) -> torch.dtype:
        return _PRECISIONS[self.precision]

    def compile(self) -> None:
        """torch.compile both towers (dynamic shapes: batch sizes and trimmed lengths vary)."""
        module = self.module
        text = ((lambda tokens: encode_text_trimmed(module, tokens)) if self.trims_text
                else module.encode_text)
        self._text_forward = torch.compile(text, dynamic=True)
        self._image_forward = torch.compile(module.encode_image, dynamic=True)
        self.compiled = True
        self.pausable = False  # a compiled graph does not stop at Python hooks

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 text embeddings, one row per text."""
        tokens = self.tokenizer(texts).to(self.device, non_blocking=True)
        if self._text_forward is not None:
            return self._finish(self._text_forward(tokens))
        if self.trims_text:
            return self._finish(encode_text_trimmed(self.module, tokens))
        return self._finish(self.module.encode_text(tokens))

    @property
    def trims_text(self) -> bool:
        """Whether text runs only up to the batch's longest sequence (see encode_text_trimmed)."""
        return self.trim_text and supports_text_trimming(self.module)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor,
                      between: Callable[[], None] | None = None) -> np.ndarray:
        """Unit-length float32 image embeddings for a batch of preprocessed images.

        `between`, on a pausable model, is called after each of the image tower's residual
        blocks: the batcher serves waiting queries there, so a query waits for one block (a
        twelfth of a ViT-B-32 call), never for a whole bulk batch, and bulk batches keep the
        size that runs fastest. It must not call encode_images with `between` itself.
        """
        if self.device.type == "cuda" and pixels.device.type == "cpu":
            pixels = pixels.pin_memory()  # page-locked: the copy below runs asynchronously
        pixels = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        self._between = between
        try:
            return self._finish(self._image_forward(pixels))
        finally:
            self._between = None

    @staticmethod
    def _finish(features: torch.Tensor) -> np.ndarray:
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32, copy=False)


def _hook_image_blocks(module: torch.nn.Module, hook: Callable[..., None]) -> bool:
    """Call `hook` after each residual block of a ViT image tower; False for other towers.

    A forward hook runs between blocks in the model's thread and changes nothing in the
    computation, so the embeddings stay open_clip's own.
    """
    blocks = getattr(getattr(getattr(module, "visual", None), "transformer", None),
                     "resblocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) < 2:
        return False
    for block in blocks[:-1]:  # after the last one the call is about to end anyway
        block.register_forward_hook(hook)
    return True


def supports_text_trimming(module: torch.nn.Module) -> bool:
    """True for open_clip's CLIP text tower with a causal mask and end-token pooling.

    There, position i only sees positions <= i and the output is read at the end token, so
    the padding after the longest sequence of a batch cannot change any output.
    """
    return (
        isinstance(module, open_clip.CLIP)
        and getattr(module, "attn_mask", None) is not None
        and getattr(module, "text_pool_type", None) == "argmax"
    )


def encode_text_trimmed(module: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text run on the first L positions only, L the longest sequence.

    Short queries (5 words of 77 positions) cost a fraction of the padded pass; the result
    equals the padded one up to float rounding (tested within 1e-5).
    """
    ends = tokens.argmax(dim=-1)  # the end token has the highest id (argmax pooling)
    length = int(ends.max()) + 1
    cast_dtype = module.transformer.get_cast_dtype()
    x = module.token_embedding(tokens[:, :length]).to(cast_dtype)
    x = x + module.positional_embedding[:length].to(cast_dtype)
    x = module.transformer(x, attn_mask=module.attn_mask[:length, :length])
    x = module.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), ends]
    if isinstance(module.text_projection, torch.nn.Linear):
        return module.text_projection(x)
    return x @ module.text_projection


def resolve_device(requested: str) -> torch.device:
    """`auto` is cuda when torch sees a GPU, else cpu."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"--device {requested} was asked for but torch sees no CUDA GPU "
            f"(torch {torch.__version__}); use --device cpu or --device auto"
        )
    return device


def register_model_configs(extra_dir: Path | None) -> None:
    """Make our bundled configs, and a user's folder of them, known to open_clip by name."""
    open_clip.add_model_config(bundled_config_dir())
    if extra_dir is not None:
        if not extra_dir.is_dir():
            raise ModelLoadError(f"--model-config-dir {extra_dir} is not a folder")
        open_clip.add_model_config(extra_dir)


def fingerprint_of(settings: AnySettings) -> str:
    """Names the embedding space: same model and weights give the same fingerprint."""
    if settings.checkpoint is not None:
        digest = hashlib.sha256()
        with open(settings.checkpoint, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return f"{settings.model}/sha256:{digest.hexdigest()[:16]}"
    if settings.random_weights:
        return f"{settings.model}/random-seed-{RANDOM_SEED}"
    return f"{settings.model}/{settings.pretrained}"


def _check_model_name(name: str) -> None:
    if open_clip.get_model_config(name) is not None:
        return
    close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelLoadError(
        f"unknown model architecture {name!r}.{hint} `python -c 'import open_clip; "
        f"print(open_clip.list_models())'` lists them all; --model-config-dir adds your own."
    )


def _check_pretrained_tag(name: str, tag: str) -> None:
    if not tag:
        raise ModelLoadError(
            f"no weights chosen for {name}: the catalog has no default tag for it. Give "
            f"--pretrained TAG (known: {', '.join(open_clip.list_pretrained_tags_by_model(name))}"
            "), --checkpoint PATH, or --random-weights."
        )
    if not open_clip.get_pretrained_cfg(name, tag):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelLoadError(
            f"{name} has no pretrained tag {tag!r}; its tags are: {', '.join(tags) or 'none'}"
        )


def load_model(settings: AnySettings, precision: str | None = None) -> ClipModel:
    """Build the model the settings describe, or raise ModelLoadError saying what to do.

    `precision` overrides the settings' (ONNX export starts from fp32 whatever is served).
    """
    started = time.perf_counter()
    register_model_configs(settings.model_config_dir)
    _check_model_name(settings.model)
    device = resolve_device(settings.device)
    precision, precision_reason = choose_precision(precision or settings.precision, device)
    if precision == "fp16" and device.type == "cpu":
        raise ModelLoadError("--precision fp16 needs a GPU; use fp32 (or bf16) on the CPU")
    if device.type == "cuda" and precision == "fp32":
        # fp32 promises open_clip's numbers: no TF32 (cuDNN uses it for convolutions by
        # default, which moves the patch embedding by ~1e-3).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if settings.checkpoint is not None:
        weights: str | None = str(settings.checkpoint)
    elif settings.random_weights:
        weights = None
        torch.manual_seed(RANDOM_SEED)
    else:
        _check_pretrained_tag(settings.model, settings.pretrained or "")
        weights = settings.pretrained
        try:
            check_weights_reachable(settings.model, weights or "", settings.cache_dir)
        except WeightsUnavailable as exc:
            raise ModelLoadError(str(exc)) from None
    try:
        module, _, transform = open_clip.create_model_and_transforms(
            settings.model,
            pretrained=weights,
            device=device,
            precision=precision,
            cache_dir=str(settings.cache_dir) if settings.cache_dir else None,
        )
    except Exception as exc:
        raise ModelLoadError(_explain_failure(settings, exc)) from exc
    module.eval()
    tokenizer = open_clip.get_tokenizer(settings.model)
    embed_dim = _embed_dim(module, settings.model)
    size = module.visual.image_size
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    model = ClipModel(
        name=settings.model,
        pretrained=settings.pretrained if weights and settings.checkpoint is None else None,
        checkpoint=settings.checkpoint,
        random_weights=settings.random_weights,
        device=device,
        precision=precision,
        precision_reason=precision_reason,
        dim=embed_dim,
        image_size=image_size,
        fingerprint=fingerprint_of(settings),
        module=module,
        transform=transform,
        tokenizer=tokenizer,
    )
    if settings.channels_last == "on" or (settings.channels_last == "auto"
                                          and device.type == "cuda"):
        module.visual.to(memory_format=torch.channels_last)
        model.channels_last = True
    if settings.compile:
        model.compile()
    model.load_seconds = time.perf_counter() - started
    return model


def _embed_dim(module: torch.nn.Module, name: str) -> int:
    cfg = open_clip.get_model_config(name) or {}
    if "embed_dim" in cfg:
        return int(cfg["embed_dim"])
    with torch.inference_mode():
        return int(module.encode_text(open_clip.get_tokenizer(name)(["x"])).shape[-1])


def _explain_failure(settings: AnySettings, exc: Exception) -> str:
    offline = (
        "Offline choices: --checkpoint PATH (a local open_clip checkpoint file, e.g. the "
        "open_clip_pytorch_model.bin of the model's Hugging Face page), or --random-weights "
        "to try the API and benchmark (search results are then meaningless)."
    )
    if settings.checkpoint is not None:
        return (
            f"could not load checkpoint {settings.checkpoint} into {settings.model}: {exc}. "
            "Is --model the architecture the checkpoint was trained as?"
        )
    if not settings.random_weights:
        return (
            f"could not download the pretrained weights {settings.pretrained!r} for "
            f"{settings.model}: {exc}. This machine may have no internet access, or the "
            f"download cache is unwritable (--cache-dir). {offline}"
        )
    return f"could not build {settings.model}: {exc}"
