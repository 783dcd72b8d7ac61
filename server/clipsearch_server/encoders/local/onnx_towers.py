"""ONNX Runtime versions of the two CLIP towers, exported from the loaded torch model.

Why: on a CPU without native bf16, ONNX Runtime's fused kernels (and its dynamic int8 path)
run the towers faster than eager torch fp32, with the same embeddings. The graphs are traced
(`torch.onnx.export(dynamo=False)`) from the very module `load_model` built, so the weights are
the ones the torch backend serves; they are cached on disk, keyed by the model's fingerprint
and every version that changes the graph, so only the first start pays for the export.

The text graph is `encode_text_trimmed`: it takes tokens already cut to the batch's longest
sequence (dynamic batch and length), slices the causal mask and position table by that length
and pools at each row's end token (the argmax of the ids). The graphs return un-normalised
features; OnnxTowers normalises them like ClipModel._finish.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from .model import ClipModel, supports_text_trimming
from .onnx_stages import ImageStage, stage_count, stage_input, stage_names, stages_match

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is a single op from 17 on, which ORT runs fused
# Bump when the exported graphs change (wrappers below, quantisation options): old caches
# then miss instead of loading a graph this code no longer writes.
GRAPH_FORMAT = 2  # 2: the image tower as one graph per block (onnx_stages.py)
PRECISIONS = ("fp32", "int8")
# Per-channel int8 weights: on ViT-B-32 (random weights, ORT 1.32, 2 AVX-512 VNNI cores) they
# ran as fast as per-tensor ones (images equal, texts within 3%) and lifted the worst cosine to
# fp32 from 0.99978 to 0.99983 (images) and 0.99874 to 0.99931 (texts). ORT's quantisation
# pre-processing and thread spinning changed nothing measurable, so neither is used.
INT8_PER_CHANNEL = True
MAX_GRAPH_BYTES = 2_000_000_000  # a single-file ONNX graph is one protobuf, capped at 2 GiB
STALE_TEMP_S = 15 * 60  # a temp file untouched this long was left by a killed export


def tower_file(tower: str, precision: str) -> str:
    """The cache file name of one tower at one precision: image.onnx, text.int8.onnx, ..."""
    return f"{tower}.onnx" if precision == "fp32" else f"{tower}.{precision}.onnx"


def cache_folder(model: ClipModel, cache_dir: Path) -> Path:
    """Where this model's graphs live: a readable name plus a hash of what shapes the graph."""
    key = "|".join([model.fingerprint, torch.__version__, open_clip.__version__,
                    ort.__version__, str(OPSET), str(GRAPH_FORMAT)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model.fingerprint).strip("._") or "model"
    return Path(cache_dir) / f"{safe[:80]}-{digest}"


# --- export ---------------------------------------------------------------------------------
class _TraceableAttention(torch.nn.Module):
    """nn.MultiheadAttention's maths in plain ops, sharing its weights.

    torch's own module traces badly: its CPU fast path (`_native_multi_head_attention`) has
    no ONNX export, and its slow path bakes the traced sequence length into a Reshape, which
    breaks the dynamic text length. Shapes here only come from unflatten/flatten.
    """

    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        if mha.in_proj_weight is None or mha.bias_k is not None:
            raise NotImplementedError("attention with separate q/k/v sizes or bias_k/bias_v")
        self.mha = mha

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None,
                **_: object) -> tuple[torch.Tensor, None]:
        mha = self.mha
        if not mha.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        heads, head_dim = mha.num_heads, mha.head_dim
        weight, bias = mha.in_proj_weight, mha.in_proj_bias
        if key is query and value is query:  # self-attention: one matmul for q, k and v
            qkv = F.linear(query, weight, bias).unflatten(-1, (3, heads, head_dim))
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            biases = bias.chunk(3) if bias is not None else (None, None, None)
            q, k, v = (F.linear(x, w, b).unflatten(-1, (heads, head_dim)).transpose(1, 2)
                       for x, w, b in zip((query, key, value), weight.chunk(3), biases,
                                          strict=True))
        scores = (q * head_dim ** -0.5) @ k.transpose(-1, -2)
        if attn_mask is not None:
            scores = scores + attn_mask
        out = mha.out_proj((scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2))
        return (out if mha.batch_first else out.transpose(0, 1)), None


def _export_clone(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree sharing every tensor, with traceable attention and no hooks.

    The live module is left alone: it may be serving while we export, and its forward hooks
    (the batcher's pause points) must not run inside a trace.
    """
    clone = module.__new__(type(module))
    clone.__dict__.update(module.__dict__)
    clone._forward_hooks = type(module._forward_hooks)()
    clone._forward_pre_hooks = type(module._forward_pre_hooks)()
    clone._modules = {}
    for name, child in module._modules.items():
        if child is None:
            clone._modules[name] = None
        elif isinstance(child, torch.nn.MultiheadAttention):
            clone._modules[name] = _TraceableAttention(child)
        else:
            clone._modules[name] = _export_clone(child)
    return clone


class _ImageGraph(torch.nn.Module):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.clip = module

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixels)


class _TextGraph(torch.nn.Module):
    """encode_text_trimmed with the length read from the input's shape (dynamic in the trace)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.clip = module

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        length = tokens.shape[1]
        ends = tokens.argmax(dim=-1)
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast_dtype)
        x = x + clip.positional_embedding[:length].to(cast_dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        # gather, then [:, 0]: squeeze(1) of a dynamic dim exports as an If node
        x = x.gather(1, ends.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))[:, 0]
        if isinstance(clip.text_projection, torch.nn.Linear):
            return clip.text_projection(x)
        return x @ clip.text_projection


def graph_names(model: ClipModel, folder: Path | None = None) -> list[str]:
    """The graphs of this model: one per image block where the cut fits (onnx_stages), or the
    whole image tower; then the text tower.

    A cache `folder` that holds either form says which, so a start from the cache runs no
    model forward to find out.
    """
    if folder is not None and (folder / tower_file("image.00", "fp32")).is_file():
        return [*stage_names(stage_count(model.module)), "text"]
    if folder is not None and (folder / tower_file("image", "fp32")).is_file():
        return ["image", "text"]
    clone = _export_clone(model.module)
    pixels = torch.randn(2, 3, model.image_size, model.image_size, device=model.device)
    image = stage_names(stage_count(clone)) if stages_match(clone, pixels) else ["image"]
    return [*image, "text"]


def _graph_and_input(model: ClipModel, clone: torch.nn.Module, tower: str
                     ) -> tuple[torch.nn.Module, torch.Tensor, str]:
    size = model.image_size
    pixels = torch.zeros(2, 3, size, size, device=model.device)
    if tower == "image":
        return _ImageGraph(clone), pixels, "pixels"
    if tower.startswith("image."):
        index = int(tower.split(".")[1])
        return (ImageStage(clone.visual, index, stage_count(clone)),
                stage_input(clone, index, pixels), "pixels" if index == 0 else "tokens")
    tokens = model.tokenizer(["a photo", "two dogs running on a beach"]).to(model.device)
    return _TextGraph(clone), tokens[:, :int(tokens.argmax(dim=-1).max()) + 1], "tokens"


def _check_exportable(model: ClipModel) -> None:
    if model.precision != "fp32":
        raise ValueError(f"export needs the fp32 model, not {model.precision}: the graphs "
                         "are the fp32 reference that int8 is quantised from")
    if not supports_text_trimming(model.module):
        raise NotImplementedError(
            f"{model.name}: only open_clip CLIP models with a causal text tower and "
            "end-token pooling export to ONNX here; use the torch backend")
    module = model.module
    for tower in ([module.visual], [module.transformer, module.token_embedding]):
        size = sum(p.numel() * p.element_size() for part in tower for p in part.parameters())
        if size > MAX_GRAPH_BYTES:
            raise NotImplementedError(f"{model.name}: a {size / 1e9:.1f} GB tower is over "
                                      "the 2 GiB a single-file ONNX graph can hold")


def _export_tower(model: ClipModel, folder: Path, tower: str) -> None:
    started = time.perf_counter()
    graph, example, input_name = _graph_and_input(model, _export_clone(model.module), tower)
    dynamic = {0: "batch", 1: "length"} if tower == "text" else {0: "batch"}

    def write(path: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
            torch.onnx.export(graph.eval(), (example,), str(path), dynamo=False,
                              opset_version=OPSET, input_names=[input_name],
                              output_names=["features"], do_constant_folding=True,
                              dynamic_axes={input_name: dynamic, "features": {0: "batch"}})

    _write_atomically(folder / tower_file(tower, "fp32"), write)
    log.info("exported the %s tower of %s to ONNX in %.1f s", tower, model.fingerprint,
             time.perf_counter() - started)


def _quantize_tower(folder: Path, tower: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    started = time.perf_counter()
    source = folder / tower_file(tower, "fp32")

    def write(path: Path) -> None:
        previous = logging.root.manager.disable
        # It logs a root INFO line per tensor it leaves alone, and a WARNING advising its
        # pre-processing, which gained nothing here (see INT8_PER_CHANNEL).
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(source, path, weight_type=QuantType.QInt8,
                             per_channel=INT8_PER_CHANNEL)
        finally:
            logging.disable(previous)

    _write_atomically(folder / tower_file(tower, "int8"), write)
    log.info("quantised the %s tower to int8 in %.1f s", tower, time.perf_counter() - started)


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """`write` into a temp file beside `target`, flush it to disk, then rename it over.

    A killed export leaves only a temp file, never a half `target` that a later start loads.
    """
    temp = target.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{target.name}")  # ends in .onnx
    try:
        write(temp)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform opens folders
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temps(folder: Path) -> None:
    now = time.time()
    for temp in folder.glob(".tmp-*"):
        try:
            if now - temp.stat().st_mtime > STALE_TEMP_S:
                temp.unlink()
        except OSError:
            pass  # another process took it first


def export_towers(model: ClipModel, cache_dir: Path, int8: bool = False,
                  graphs: list[str] | None = None) -> Path:
    """Export whatever graphs of this model the cache lacks; the cache folder.

    A file already there is trusted (writes are atomic); OnnxTowers re-exports one that fails
    to load.
    """
    _check_exportable(model)
    folder = cache_folder(model, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder)
    for tower in graphs or graph_names(model):
        if not (folder / tower_file(tower, "fp32")).is_file():
            _export_tower(model, folder, tower)
        if int8 and not (folder / tower_file(tower, "int8")).is_file():
            _quantize_tower(folder, tower)
    return folder


# --- inference ------------------------------------------------------------------------------
def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings are about unused initialisers
    # Idle worker threads sleep instead of spinning: in the server they share the cores
    # with decoding and gRPC, and spinning cost those more than it saved here.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _rebuild(model: ClipModel, folder: Path, tower: str, precision: str) -> None:
    (folder / tower_file(tower, precision)).unlink(missing_ok=True)
    if precision == "fp32":
        _export_tower(model, folder, tower)
        return
    try:
        _quantize_tower(folder, tower)
    except Exception as exc:  # the fp32 source is damaged too
        log.warning("quantising %s failed (%s); exporting its fp32 graph again", tower, exc)
        _export_tower(model, folder, tower)
        _quantize_tower(folder, tower)


def _normalise(features: np.ndarray) -> np.ndarray:
    """Unit rows, as torch.nn.functional.normalize (eps 1e-12) gives them."""
    features = features.astype(np.float32, copy=False)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, np.float32(1e-12))


class OnnxTowers:
    """Both towers on ONNX Runtime's CPU provider, standing in for ClipModel's encode_*."""

    backend = "onnxruntime"
    device = torch.device("cpu")

    def __init__(self, image: list[ort.InferenceSession], text: ort.InferenceSession,
                 tokenizer: Callable[[list[str]], torch.Tensor], dim: int, image_size: int,
                 precision: str, folder: Path,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None) -> None:
        self.image_sessions = image  # one per block (onnx_stages), or the whole tower
        # encode_images takes `between=`, called between stages: a bulk call can pause
        self.pausable = len(image) > 1
        self.text_session = text
        self.tokenizer = tokenizer
        self.transform = transform  # the model's preprocessing, which the embedder runs
        self.dim = dim
        self.image_size = image_size
        self.precision = precision
        self.folder = folder

    @classmethod
    def from_model(cls, model: ClipModel, cache_dir: Path, precision: str = "fp32",
                   threads: int | None = None) -> OnnxTowers:
        """Load the cached graphs of `model`, exporting (or re-exporting) those missing."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        graphs = graph_names(model, cache_folder(model, cache_dir))
        folder = export_towers(model, cache_dir, int8=precision == "int8", graphs=graphs)
        threads = threads or os.cpu_count() or 1
        sessions = {}
        for tower in graphs:
            path = folder / tower_file(tower, precision)
            try:
                sessions[tower] = _session(path, threads)
            except Exception as exc:  # ORT's load errors subclass Exception only
                log.warning("cached ONNX graph %s did not load (%s); exporting it again",
                            path, exc)
                _rebuild(model, folder, tower, precision)
                sessions[tower] = _session(path, threads)
        return cls([sessions[g] for g in graphs if g != "text"], sessions["text"],
                   model.tokenizer, model.dim,
                   model.image_size, precision, folder, model.transform)

    def encode_images(self, pixels: torch.Tensor,
                      between: Callable[[], None] | None = None) -> np.ndarray:
        """Unit-length float32 image embeddings for a batch of preprocessed images.

        `between` is called between stages (ClipModel.encode_images says why).
        """
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        x = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        last = len(self.image_sessions) - 1
        for i, session in enumerate(self.image_sessions):
            x = session.run(None, {session.get_inputs()[0].name: x})[0]
            if between is not None and i < last:
                between()
        return _normalise(x)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 text embeddings, one row per text."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenizer(texts)
        length = int(tokens.argmax(dim=-1).max()) + 1  # the end token has the highest id
        array = np.ascontiguousarray(tokens[:, :length].numpy().astype(np.int64, copy=False))
        return _normalise(self.text_session.run(None, {"tokens": array})[0])
