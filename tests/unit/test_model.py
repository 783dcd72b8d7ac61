"""load_model, the model catalog and the settings parser.

Only the tiny architecture is ever built; nothing here downloads weights. The one test of a
failed download runs in a child process with Hugging Face's offline mode switched on before
huggingface_hub is imported (it reads HF_HUB_OFFLINE once, at import time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from clipsearch_server import catalog, config
from clipsearch_server.config import Settings, parse_settings
from clipsearch_server.encoders.local.model import ClipModel, load_model
from clipsearch_server.errors import ModelLoadError
from conftest import TINY_MODEL, save_tiny_checkpoint

TEXTS = ["a photo of a dog", "two people riding horses on a beach", "x", "long caption " * 40]


def tiny_settings(**overrides: object) -> Settings:
    # fp32: these tests compare with open_clip's own fp32 output at 1e-5 (auto may pick bf16).
    values: dict[str, object] = {"model": TINY_MODEL, "pretrained": None, "device": "cpu",
                                 "precision": "fp32"}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path) -> ClipModel:
    return load_model(tiny_settings(checkpoint=tiny_checkpoint))


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture as `tiny_checkpoint`, different (seeded) weights."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("weights-2") / "tiny-2.pt", 4321)


# --- catalog --------------------------------------------------------------------------------


def test_catalog_entries_match_open_clip() -> None:
    entries = catalog.load_catalog()
    assert entries
    for entry in entries:
        cfg = open_clip.get_model_config(entry.name)
        assert cfg is not None, f"open_clip does not know {entry.name}"
        assert entry.pretrained in open_clip.list_pretrained_tags_by_model(entry.name), entry
        assert entry.dim == cfg["embed_dim"], entry
        size = cfg["vision_cfg"]["image_size"]
        assert entry.image_size == (size[0] if isinstance(size, (list, tuple)) else size), entry
    pairs = [(e.name, e.pretrained) for e in entries]
    assert len(pairs) == len(set(pairs)), "duplicate catalog entries"


def test_catalog_default_is_first_and_matches_settings() -> None:
    raw = json.loads((catalog.bundled_config_dir().parent / "catalog.json").read_text())
    first = catalog.load_catalog()[0]
    assert raw["default"] == first.name == config.DEFAULT_MODEL
    assert first.pretrained == config.DEFAULT_PRETRAINED
    assert catalog.default_pretrained(config.DEFAULT_MODEL) == config.DEFAULT_PRETRAINED
    assert catalog.default_pretrained("no-such-model") is None


def test_bundled_tiny_config_is_registered() -> None:
    open_clip.add_model_config(catalog.bundled_config_dir())
    cfg = open_clip.get_model_config(TINY_MODEL)
    assert cfg is not None and cfg["embed_dim"] == 64 and cfg["vision_cfg"]["image_size"] == 64


# --- loading a checkpoint -------------------------------------------------------------------


def test_checkpoint_load(tiny: ClipModel, tiny_checkpoint: Path) -> None:
    assert (tiny.dim, tiny.image_size) == (64, 64)
    assert tiny.device == torch.device("cpu")
    assert tiny.checkpoint == tiny_checkpoint
    assert tiny.pretrained is None and not tiny.random_weights
    assert tiny.fingerprint.startswith(f"{TINY_MODEL}/sha256:")
    assert len(tiny.fingerprint.split("sha256:")[1]) == 16
    assert not tiny.module.training


def test_fingerprint_is_stable_and_follows_the_weights(
        tiny: ClipModel, tiny_checkpoint: Path, other_checkpoint: Path) -> None:
    again = load_model(tiny_settings(checkpoint=tiny_checkpoint))
    assert again.fingerprint == tiny.fingerprint
    other = load_model(tiny_settings(checkpoint=other_checkpoint))
    assert other.fingerprint.startswith(f"{TINY_MODEL}/sha256:")
    assert other.fingerprint != tiny.fingerprint
    assert not np.allclose(other.encode_texts(TEXTS[:1]), tiny.encode_texts(TEXTS[:1]))


def test_text_embeddings_equal_open_clip(tiny: ClipModel, tiny_checkpoint: Path) -> None:
    ref, _, _ = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=str(tiny_checkpoint))
    ref.eval()
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    with torch.inference_mode():
        expected = ref.encode_text(tokenizer(TEXTS), normalize=True).numpy()
    got = tiny.encode_texts(TEXTS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.abs(got[0] - got[1]).max() > 1e-3


def test_image_embeddings_equal_open_clip(tiny: ClipModel, tiny_checkpoint: Path) -> None:
    ref, _, _ = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=str(tiny_checkpoint))
    ref.eval()
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = ref.encode_image(pixels, normalize=True).numpy()
    got = tiny.encode_images(pixels)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_transform_is_open_clips(tiny: ClipModel) -> None:
    from PIL import Image

    pixels = tiny.transform(Image.new("RGB", (100, 50), (10, 200, 30)))
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32


# --- random weights -------------------------------------------------------------------------


def test_random_weights_are_seeded(tiny: ClipModel) -> None:
    first = load_model(tiny_settings(random_weights=True))
    torch.manual_seed(999)  # whatever the global RNG state, the load reseeds
    second = load_model(tiny_settings(random_weights=True))
    assert first.random_weights and first.checkpoint is None and first.pretrained is None
    assert first.fingerprint == f"{TINY_MODEL}/random-seed-0"
    assert first.fingerprint.endswith("random-seed-0")
    a, b = first.encode_texts(TEXTS), second.encode_texts(TEXTS)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, tiny.encode_texts(TEXTS))


def test_bf16_on_cpu_loads() -> None:
    model = load_model(tiny_settings(random_weights=True, precision="bf16"))
    assert model.dtype == torch.bfloat16
    out = model.encode_images(torch.zeros(1, 3, 64, 64))
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3)


# --- helpful failures -----------------------------------------------------------------------


def test_unknown_architecture_suggests_a_close_match() -> None:
    with pytest.raises(ModelLoadError, match="unknown model architecture 'ViT-B-3'") as info:
        load_model(Settings(model="ViT-B-3", pretrained="openai", device="cpu"))
    assert "Did you mean" in str(info.value) and "ViT-B-32" in str(info.value)


def test_unknown_architecture_without_close_match() -> None:
    with pytest.raises(ModelLoadError, match="unknown model architecture") as info:
        load_model(tiny_settings(model="zzzzzzzzzzzzzzzz", random_weights=True))
    assert "Did you mean" not in str(info.value)
    assert "--model-config-dir" in str(info.value)


def test_unknown_pretrained_tag_lists_real_tags() -> None:
    with pytest.raises(ModelLoadError, match="no pretrained tag 'laion9000'") as info:
        load_model(Settings(model="ViT-B-32", pretrained="laion9000", device="cpu"))
    message = str(info.value)
    for tag in ("laion2b_s34b_b79k", "openai"):
        assert tag in open_clip.list_pretrained_tags_by_model("ViT-B-32")
        assert tag in message


def test_no_tag_at_all_says_how_to_choose() -> None:
    with pytest.raises(ModelLoadError, match="no weights chosen") as info:
        load_model(Settings(model="ViT-L-14", pretrained="", device="cpu"))
    message = str(info.value)
    assert "--pretrained" in message and "--checkpoint" in message
    assert "--random-weights" in message and "openai" in message


def test_checkpoint_for_another_architecture(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The tiny weights loaded as a wider sibling architecture: shapes do not fit."""
    cfg = json.loads((catalog.bundled_config_dir() / f"{TINY_MODEL}.json").read_text())
    cfg["embed_dim"] = 96
    cfg["text_cfg"]["width"] = 96
    (tmp_path / "clipsearch-tiny-wide.json").write_text(json.dumps(cfg))
    settings = tiny_settings(model="clipsearch-tiny-wide", checkpoint=tiny_checkpoint,
                             model_config_dir=tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_model(settings)
    message = str(info.value)
    assert str(tiny_checkpoint) in message and "clipsearch-tiny-wide" in message
    assert "Is --model the architecture" in message


def test_checkpoint_with_missing_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    state = torch.load(tiny_checkpoint, weights_only=True)
    del state["text_projection"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match="text_projection"):
        load_model(tiny_settings(checkpoint=path))


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(np.random.default_rng(3).bytes(10_000))
    with pytest.raises(ModelLoadError, match="could not load checkpoint") as info:
        load_model(tiny_settings(checkpoint=path))
    assert str(path) in str(info.value)


def test_model_config_dir_must_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is not a folder"):
        load_model(tiny_settings(random_weights=True, model_config_dir=tmp_path / "nope"))


def test_fp16_on_cpu_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="fp16 needs a GPU"):
        load_model(tiny_settings(random_weights=True, precision="fp16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_refused(device: str) -> None:
    with pytest.raises(ModelLoadError, match="torch sees no CUDA GPU") as info:
        load_model(tiny_settings(random_weights=True, device=device))
    assert "--device cpu" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_auto_device_is_cpu_without_a_gpu() -> None:
    assert load_model(tiny_settings(random_weights=True, device="auto")).device.type == "cpu"


OFFLINE_SCRIPT = textwrap.dedent("""
    import socket
    import sys
    from pathlib import Path

    def no_network(*args, **kwargs):
        raise OSError("network blocked by the test")

    # Belt and braces: offline mode should stop the download, and no socket may connect.
    socket.socket.connect = no_network
    socket.socket.connect_ex = no_network
    socket.create_connection = no_network

    import huggingface_hub.constants
    from clipsearch_server.config import Settings
    from clipsearch_server.errors import ModelLoadError
    from clipsearch_server.encoders.local.model import load_model

    assert huggingface_hub.constants.is_offline_mode(), "HF_HUB_OFFLINE was not honoured"
    settings = Settings(model=sys.argv[1], pretrained=sys.argv[2], device="cpu",
                        cache_dir=Path(sys.argv[3]))
    try:
        load_model(settings)
    except ModelLoadError as exc:
        print(exc)
        sys.exit(3)
    sys.exit(0)
""")


def test_pretrained_download_impossible_offline(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update({
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
    })
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, "ViT-B-32", "laion2b_s34b_b79k", str(cache)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    message = proc.stdout
    assert "could not download the pretrained weights 'laion2b_s34b_b79k'" in message
    assert "--checkpoint" in message and "--random-weights" in message
    assert not any(p.is_file() and p.stat().st_size > 1_000_000 for p in tmp_path.rglob("*"))


# --- settings -------------------------------------------------------------------------------


def test_settings_defaults(clean_env: pytest.MonkeyPatch) -> None:
    s = parse_settings([])
    assert s == Settings()
    assert s.model == config.DEFAULT_MODEL and s.pretrained == config.DEFAULT_PRETRAINED
    assert s.weights_source == f"pretrained tag {config.DEFAULT_PRETRAINED}"


def test_environment_overrides_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("CLIPSEARCH_PORT", "6001")
    clean_env.setenv("CLIPSEARCH_DATA_DIR", str(tmp_path))
    clean_env.setenv("CLIPSEARCH_PRECISION", "bf16")
    clean_env.setenv("CLIPSEARCH_MAX_IMAGE_PIXELS", "1234")
    clean_env.setenv("CLIPSEARCH_SNAPSHOT_INTERVAL_S", "2.5")
    clean_env.setenv("CLIPSEARCH_PRETRAINED", "openai")
    clean_env.setenv("CLIPSEARCH_HOST", "")  # empty means unset
    s = parse_settings([])
    assert (s.port, s.data_dir, s.precision) == (6001, tmp_path, "bf16")
    assert (s.max_image_pixels, s.snapshot_interval_s) == (1234, 2.5)
    assert s.pretrained == "openai" and s.host == Settings().host


def test_flags_override_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CLIPSEARCH_PORT", "6001")
    clean_env.setenv("CLIPSEARCH_MODEL", "ViT-B-16")
    clean_env.setenv("CLIPSEARCH_PRETRAINED", "openai")
    s = parse_settings(["--port", "7002", "--model", "RN50", "--pretrained", "yfcc15m"])
    assert (s.port, s.model, s.pretrained) == (7002, "RN50", "yfcc15m")


def test_random_weights_from_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CLIPSEARCH_RANDOM_WEIGHTS", "true")
    s = parse_settings(["--model", TINY_MODEL])
    assert s.random_weights and s.pretrained is None
    clean_env.setenv("CLIPSEARCH_RANDOM_WEIGHTS", "0")
    assert not parse_settings([]).random_weights


def test_checkpoint_clears_the_default_tag(
        clean_env: pytest.MonkeyPatch, tiny_checkpoint: Path) -> None:
    s = parse_settings(["--checkpoint", str(tiny_checkpoint)])
    assert s.checkpoint == tiny_checkpoint and s.pretrained is None
    assert s.weights_source == f"checkpoint {tiny_checkpoint}"
    # A tag from the environment yields to a checkpoint flag too.
    clean_env.setenv("CLIPSEARCH_PRETRAINED", "openai")
    assert parse_settings(["--checkpoint", str(tiny_checkpoint)]).pretrained is None


def test_uncatalogued_model_without_a_tag(clean_env: pytest.MonkeyPatch) -> None:
    # No tag is invented for it; load_model then says how to choose one, before any build.
    s = parse_settings(["--model", "RN50", "--device", "cpu"])
    assert not s.pretrained and s.checkpoint is None and not s.random_weights
    with pytest.raises(ModelLoadError, match="no weights chosen for RN50"):
        load_model(s)


def test_non_default_model_gets_the_catalog_tag(clean_env: pytest.MonkeyPatch) -> None:
    assert parse_settings(["--model", "ViT-B-16"]).pretrained == "laion2b_s34b_b88k"


@pytest.mark.parametrize(
    "argv",
    [
        ["--precision", "fp8"],
        ["--device", "tpu"],
        ["--port", "70000"],
        ["--max-k", "0"],
        ["--port", "not-a-number"],
        ["--checkpoint", "/no/such/file.pt"],
        ["--pretrained", "openai", "--random-weights"],
    ],
)
def test_invalid_flags_exit_with_usage_error(
        clean_env: pytest.MonkeyPatch, argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        parse_settings(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_invalid_environment_value_is_a_usage_error(
        clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    clean_env.setenv("CLIPSEARCH_PRECISION", "fp8")
    with pytest.raises(SystemExit) as info:
        parse_settings([])
    assert info.value.code == 2
    assert "--precision must be auto, fp32, fp16, bf16 or int8" in capsys.readouterr().err


def test_channels_last_and_compile_keep_the_embeddings(tiny_checkpoint) -> None:
    """GPU-minded options, exercised on the CPU: same vectors within float tolerance."""
    plain = load_model(Settings(model="clipsearch-tiny", pretrained=None,
                                checkpoint=tiny_checkpoint, device="cpu", precision="fp32"))
    tuned = load_model(Settings(model="clipsearch-tiny", pretrained=None,
                                checkpoint=tiny_checkpoint, device="cpu", precision="fp32",
                                channels_last="on", compile=True))
    assert tuned.channels_last and tuned.compiled and not plain.channels_last
    pixels = torch.randn(3, 3, 64, 64)
    texts = ["a dog", "two people riding horses on a beach"]
    np.testing.assert_allclose(tuned.encode_images(pixels), plain.encode_images(pixels),
                               atol=1e-5)
    np.testing.assert_allclose(tuned.encode_texts(texts), plain.encode_texts(texts), atol=1e-5)
