"""Before open_clip downloads pretrained weights: are they cached, can they be downloaded?

Without internet, huggingface_hub retries and logs for a long while before it gives up, and a
newcomer reads a wall of tracebacks. This check answers in a few seconds with one message that
says what to run instead: weights already in the cache need no network; otherwise the cache
must be writable and the download host must accept a connection.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import getproxies, proxy_bypass

import open_clip

# How long the download host gets to accept a TCP connection (name lookup included).
CONNECT_TIMEOUT_S = 4.0
OFFLINE_HELP = (
    'Without internet, run `make serve SERVE_ARGS="--checkpoint PATH"` with a local open_clip '
    "checkpoint file (e.g. the open_clip_pytorch_model.bin of the model's Hugging Face page; "
    "flag --checkpoint), or `make serve-random` to try the API with random weights (flag "
    "--random-weights; search results are then meaningless)."
)


class WeightsUnavailable(Exception):
    """The pretrained weights are not cached and cannot be downloaded now."""


def check_weights_reachable(model: str, tag: str, cache_dir: Path | None) -> None:
    """Return when the weights are cached or can be downloaded; raise WeightsUnavailable
    with a message naming the offline alternatives otherwise."""
    cfg = open_clip.get_pretrained_cfg(model, tag) or {}
    if not cfg or cfg.get("file"):
        return
    what = f"the pretrained weights {tag!r} for {model}"
    hub = cfg.get("hf_hub", "")
    if hub:
        import huggingface_hub
        import huggingface_hub.constants as hf

        repo, filename = os.path.split(hub)
        names = [filename or "open_clip_pytorch_model.bin"]
        names += [n[: n.rfind(".")] + ".safetensors" for n in names] + [
            "open_clip_model.safetensors"]
        for name in names:
            found = huggingface_hub.try_to_load_from_cache(
                repo, name, cache_dir=str(cache_dir) if cache_dir else None)
            if isinstance(found, str):
                return
        cache = cache_dir or Path(hf.HF_HUB_CACHE)
        if hf.is_offline_mode():
            raise WeightsUnavailable(
                f"could not download {what}: they are not in the cache {cache} and "
                f"HF_HUB_OFFLINE is set. {OFFLINE_HELP}")
        url = hf.ENDPOINT
    else:
        url = cfg.get("url", "")
        cache = cache_dir or Path.home() / ".cache" / "clip"
        if (cache / os.path.basename(urlparse(url).path)).is_file():
            return
    _check_writable(cache, what)
    _check_connect(url, what)


def _check_writable(cache: Path, what: str) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache):
            pass
    except OSError as exc:
        raise WeightsUnavailable(
            f"could not download {what}: the download cache {cache} is not writable "
            f"({exc.strerror or exc}); give a writable one with --cache-dir. {OFFLINE_HELP}"
        ) from None


def _check_connect(url: str, what: str) -> None:
    parsed = urlparse(url)
    if parsed.hostname and not proxy_bypass(parsed.hostname):
        proxy = getproxies().get(parsed.scheme) or getproxies().get("all")
        if proxy:  # downloads go through the proxy: it is the host that must answer
            parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[OSError | None] = []

    def connect() -> None:  # in a thread: a name lookup cannot be given a timeout
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=connect, daemon=True, name="clipsearch-connect-check")
    worker.start()
    worker.join(CONNECT_TIMEOUT_S + 1)
    problem = outcome[0] if outcome else TimeoutError(f"no answer in {CONNECT_TIMEOUT_S:.0f}s")
    if problem is not None:
        raise WeightsUnavailable(
            f"could not download {what}: {host}:{port} cannot be reached ({problem}). This "
            f"machine may have no internet access. {OFFLINE_HELP}")
