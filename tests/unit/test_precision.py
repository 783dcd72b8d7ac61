"""--precision auto: what it picks on which hardware, and its tolerance against fp32.

The tolerance is stated on ViT-B-32 (the default architecture; random weights cost and round
like trained ones) over the 256 photos of shared/data/coco128 and a set of short captions:
* cosine >= 0.999 between each bf16 vector and its fp32 twin, images and texts;
* the same top-10 neighbours in a coco128 self-retrieval (each photo against the other 255),
  up to ties: a neighbour may only swap with one whose fp32 score is within TIE of the 10th.
  With random weights many photos score alike (ties closer than 1e-6 exist), which no
  precision below fp32 can order the same way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipsearch_server.config import Settings
from clipsearch_server.encoders.local.model import ClipModel, load_model
from clipsearch_server.encoders.local.precision import choose_precision, cpu_flags, native_cpu_bf16
from conftest import coco_images

MIN_COSINE = 0.999
TIE = 1e-3  # fp32 score difference below which two neighbours count as tied
CAPTIONS = [f"{adj} {noun} {where}" for adj in ("a", "two", "a small", "an old")
            for noun in ("dog", "cat", "red bus", "person", "pizza", "horse", "boat", "kite")
            for where in ("on a beach", "in the snow", "at night", "in a kitchen")]

ZEN4 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\n"
ZEN3 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma\n"
SAPPHIRE_RAPIDS = "vendor_id\t: GenuineIntel\nflags\t\t: avx512f amx_bf16 amx_tile amx_int8\n"
SKYLAKE_X = "vendor_id\t: GenuineIntel\nflags\t\t: avx512f avx512bw avx512_vnni\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16 svebf16\nCPU implementer\t: 0x41\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize(("cpuinfo", "machine", "flag"), [
    (ZEN4, "x86_64", "avx512_bf16"),
    (ZEN3, "x86_64", None),
    (SAPPHIRE_RAPIDS, "x86_64", "amx_bf16"),
    (SKYLAKE_X, "x86_64", None),  # AVX-512 without bf16: torch would emulate it, slowly
    (GRAVITON3, "aarch64", "bf16"),
    (GRAVITON2, "aarch64", None),
    ("", "x86_64", None),
])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo: str, machine: str,
                                               flag: str | None) -> None:
    assert native_cpu_bf16(cpuinfo, machine) == flag


def test_cpu_flags_reads_the_flags_line_only() -> None:
    assert cpu_flags(ZEN4) == {"fpu", "sse2", "avx2", "avx512f", "avx512_vnni", "avx512_bf16"}
    assert "AuthenticAMD" not in cpu_flags(ZEN4)


def test_auto_picks_bf16_on_cpus_with_native_bf16_and_says_why() -> None:
    cpu = torch.device("cpu")
    precision, reason = choose_precision("auto", cpu, lambda: "avx512_bf16")
    assert precision == "bf16" and "avx512_bf16" in reason and reason.startswith("auto:")
    precision, reason = choose_precision("auto", cpu, lambda: None)
    assert precision == "fp32" and "no native bf16" in reason
    assert choose_precision("fp32", cpu, lambda: "avx512_bf16") == (
        "fp32", "--precision fp32 was asked for")


def test_auto_on_cuda_prefers_bf16_then_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision("auto", torch.device("cuda"))[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_precision("auto", torch.device("cuda"))[0] == "fp16"


def test_auto_is_the_default_and_the_loaded_model_reports_its_choice() -> None:
    assert Settings().precision == "auto"


# --- tolerance against fp32 on real photos ------------------------------------------------


def _low_precision() -> str:
    """What auto picks here, or bf16 where auto stays at fp32 (the tolerance is bf16's)."""
    chosen = choose_precision("auto", torch.device("cpu"))[0]
    return "bf16" if chosen == "fp32" else chosen


def _vit(precision: str) -> ClipModel:
    return load_model(Settings(model="ViT-B-32", pretrained=None, random_weights=True,
                               device="cpu", precision=precision))


@pytest.fixture(scope="module")
def embeddings() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    files = coco_images()
    out = {}
    for precision in ("fp32", _low_precision()):
        model = _vit(precision)
        assert model.precision == precision
        pixels = torch.stack([model.transform(Image.open(f).convert("RGB")) for f in files])
        images = np.concatenate([model.encode_images(pixels[i:i + 32])
                                 for i in range(0, len(pixels), 32)])
        out[precision] = (images, model.encode_texts(CAPTIONS))
    return out


def test_low_precision_vectors_are_within_tolerance_of_fp32(embeddings) -> None:
    (images32, texts32), (images16, texts16) = embeddings.values()
    assert len(images32) == len(coco_images()) and len(texts32) == len(CAPTIONS)
    assert (images32 * images16).sum(axis=1).min() >= MIN_COSINE
    assert (texts32 * texts16).sum(axis=1).min() >= MIN_COSINE
    assert np.abs(images32 - images16).max() > 0  # it really ran in another precision


def test_low_precision_keeps_the_top10_neighbours_of_a_self_retrieval(embeddings) -> None:
    (images32, _), (images16, _) = embeddings.values()
    exact = images32 @ images32.T
    np.fill_diagonal(exact, -np.inf)
    low = images16 @ images16.T
    np.fill_diagonal(low, -np.inf)
    top32 = np.argsort(-exact, axis=1)[:, :10]
    top16 = np.argsort(-low, axis=1)[:, :10]
    swaps = 0
    for row in range(len(exact)):
        tenth = exact[row, top32[row, -1]]
        for other in set(top16[row]) - set(top32[row]):
            assert exact[row, other] >= tenth - TIE, (row, other, tenth - exact[row, other])
            swaps += 1
    # Ties aside, the lists are the same: at most 1 % of the neighbours swap.
    assert swaps <= 0.01 * top32.size


@pytest.mark.parametrize(("backend", "precision", "device", "bf16", "chosen", "why"), [
    ("auto", "auto", "cpu", "avx512_bf16", "torch", "natively (avx512_bf16)"),
    ("auto", "auto", "cpu", None, "onnx", "no native bf16"),
    ("auto", "fp32", "cpu", None, "torch", "--precision fp32 runs on torch"),
    ("auto", "int8", "cpu", "avx512_bf16", "onnx", "int8 runs on ONNX Runtime"),
    ("auto", "auto", "cuda", None, "torch", "torch on cuda"),
    ("onnx", "auto", "cpu", "avx512_bf16", "onnx", "--backend onnx was asked for"),
    ("torch", "auto", "cpu", None, "torch", "--backend torch was asked for"),
])
def test_auto_backend_follows_the_hardware_and_says_why(
        backend: str, precision: str, device: str, bf16: str | None, chosen: str,
        why: str) -> None:
    """torch bf16 where the CPU has it, else ONNX Runtime fp32; torch on a GPU (RESULTS.md)."""
    from clipsearch_server.encoders.local.backend import choose_backend

    got, reason = choose_backend(backend, precision, torch.device(device), lambda: bf16)
    assert got == chosen and why in reason
