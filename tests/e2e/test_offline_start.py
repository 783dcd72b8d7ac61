"""A first start without internet (or with an unwritable cache) fails fast with one message.

The server is started for real with the default pretrained model while the download host
refuses connections (HF_ENDPOINT points at a closed loopback port, as on a machine without
internet) and HF offline mode is off, so nothing short-circuits the download but our check.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port

MAKE_HINTS = ("make serve-random", 'make serve SERVE_ARGS="--checkpoint PATH"')


def _offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE", "CLIPSEARCH_"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update({
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nothing listens: refused
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _serve(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "clipsearch_server", "--port", "0", "--device", "cpu",
         "--data-dir", str(tmp_path / "data"), *extra],
        env=_offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    return proc, time.monotonic() - started


def _check_one_clear_message(proc: subprocess.CompletedProcess, *wanted: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1, out
    for text in (*MAKE_HINTS, *wanted):
        assert text in errors[0], errors[0]
    assert "Traceback" not in out and "Retrying" not in out and "WARNING" not in out, out


def test_no_internet_fails_fast_naming_the_offline_commands(tmp_path: Path) -> None:
    proc, elapsed = _serve(tmp_path)
    _check_one_clear_message(proc, "could not download the pretrained weights",
                             "cannot be reached")
    assert not any(p.is_file() and p.stat().st_size > 1_000_000 for p in tmp_path.rglob("*"))
    # Start-up (Python, torch, open_clip imports) dominates on a busy machine; the check
    # itself gives the host a few seconds. Without it, the hub's retries take minutes.
    assert elapsed < 90, elapsed


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to any folder; see the next test")
def test_read_only_cache_dir_is_named(tmp_path: Path) -> None:
    cache = tmp_path / "ro-cache"
    cache.mkdir()
    cache.chmod(0o500)
    proc, _ = _serve(tmp_path, "--cache-dir", str(cache))
    _check_one_clear_message(proc, f"download cache {cache} is not writable")


def test_unusable_cache_dir_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = blocker / "cache"
    proc, _ = _serve(tmp_path, "--cache-dir", str(cache))
    _check_one_clear_message(proc, f"download cache {cache} is not writable", "--cache-dir")


def test_the_check_itself_takes_seconds(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from clipsearch_server.encoders.local.preflight import (\n"
        "    WeightsUnavailable, check_weights_reachable)\n"
        "t = time.monotonic()\n"
        "try:\n"
        "    check_weights_reachable('ViT-B-32', 'laion2b_s34b_b79k', None)\n"
        "except WeightsUnavailable as exc:\n"
        "    print(f'{time.monotonic() - t:.3f}', exc)\n"
        "    sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=_offline_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert float(proc.stdout.split()[0]) < 6.0, proc.stdout


def test_behind_a_proxy_the_proxy_is_what_must_answer(tmp_path: Path) -> None:
    proxy_port = free_port()  # nothing listens there either
    env = {**_offline_env(tmp_path), "HF_ENDPOINT": "https://hub.invalid",
           "HTTPS_PROXY": f"http://127.0.0.1:{proxy_port}", "NO_PROXY": ""}
    script = (
        "import sys\n"
        "from clipsearch_server.encoders.local.preflight import (\n"
        "    WeightsUnavailable, check_weights_reachable)\n"
        "try:\n"
        "    check_weights_reachable('ViT-B-32', 'laion2b_s34b_b79k', None)\n"
        "except WeightsUnavailable as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"127.0.0.1:{proxy_port} cannot be reached" in proc.stdout
