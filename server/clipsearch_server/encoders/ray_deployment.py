"""The replica side of `--encoder ray`: the model and its batcher inside a Ray Serve deployment.

Each replica parses the same flags as `clipsearch serve` (`model_args`), loads the model and
starts the same Embedder as the in-process encoder, so the vectors are the same numbers. The
Embedder's cross-request batcher does the batching, which is why `max_ongoing_requests` sits
well above the batch size: concurrent calls must reach the replica to meet in one batch.

Deploy it from a Serve config (deploy/ray/serve.yaml) with
`import_path: clipsearch_server.encoders.ray_deployment:app`, or from Python with `deploy()`.
No HTTP route: the fronts call it through Serve handles only.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from ..config import Settings, build_parser, parse_settings
from .base import Embedded, ModelInfo
from .local.backend import load_towers
from .local.encoder import start_embedder

__all__ = ["DEFAULT_APP", "ClipEncoderDeployment", "app", "deploy", "parse_model_args"]

DEFAULT_APP = Settings.ray_app  # the fronts' --ray-app default
# Concurrent calls one replica accepts: well above --max-batch-size (64), so that calls from
# many fronts meet in the replica's batcher (Serve's default of 5 would cap every batch at 5).
DEFAULT_MAX_ONGOING_REQUESTS = 256


def parse_model_args(model_args: list[str], check_files: bool = True) -> Settings | None:
    """`clipsearch serve` flags -> Settings, raising ValueError (not SystemExit) when wrong.

    argparse exits on a bad flag; inside a replica that would read as a crash with no reason,
    so its message is captured and raised instead, where Serve shows it in the app's status.
    `check_files=False` checks the flags only (the builder may run on a node without the
    replicas' checkpoint files) and returns None.
    """
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if not check_files:
                build_parser().parse_args([str(a) for a in model_args])
                return None
            return parse_settings([str(a) for a in model_args])
    except SystemExit:
        reason = (err.getvalue().strip().splitlines() or ["invalid"])[-1]
        raise ValueError(f"bad model_args {model_args!r}: {reason}") from None


@serve.deployment(max_ongoing_requests=DEFAULT_MAX_ONGOING_REQUESTS)
class ClipEncoderDeployment:
    """One replica: the model, its decode pool and its batcher, called by RayEncoder fronts."""

    def __init__(self, model_args: list[str]) -> None:
        settings = parse_model_args(model_args)
        assert settings is not None
        self.settings = settings
        self.towers, self._info = load_towers(self.settings)
        self.embedder = start_embedder(self.towers, self.settings, None)
        self._items = 0  # inputs embedded here: lets tests and operators see the spread
        try:
            self._replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (a unit test constructing the class directly)
            self._replica = f"pid-{os.getpid()}"

    def info(self) -> ModelInfo:
        """The model this replica serves: what the fronts report and check collections against."""
        return self._info

    def max_batch_size(self) -> int:
        """The largest model batch: fronts split bigger calls so several replicas share them."""
        return self.settings.max_batch_size

    def stats(self) -> dict[str, Any]:
        """Which replica answered and how many inputs it has embedded."""
        return {"replica": self._replica, "items": self._items, "pid": os.getpid()}

    async def embed_texts(self, texts: list[str], timeout_s: float | None = None,
                          bulk: bool = False) -> Embedded:
        """Embed texts; `timeout_s` is what is left of the caller's deadline when it sent."""
        self._items += len(texts)
        return await self.embedder.embed_texts(texts, _deadline(timeout_s), bulk)

    async def embed_images(self, images: list[bytes], timeout_s: float | None = None,
                           bulk: bool = False, thumbnail_size: int = 0) -> Embedded:
        """Decode and embed images; undecodable ones come back in `Embedded.errors`."""
        self._items += len(images)
        return await self.embedder.embed_images(images, _deadline(timeout_s), bulk,
                                                thumbnail_size)

    def check_health(self) -> None:
        """Serve's health probe: a replica whose batcher has stopped is replaced."""
        worker = getattr(self.embedder.batcher, "_thread", None)
        if worker is not None and not worker.is_alive():
            raise RuntimeError("the encoder's batcher thread has stopped")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.embedder.close()


def _deadline(timeout_s: float | None) -> float | None:
    """A remaining timeout -> this process's monotonic deadline (clocks differ across hosts)."""
    return None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)


def app(args: dict[str, Any]) -> Application:
    """Serve application builder (`import_path: clipsearch_server.encoders.ray_deployment:app`).

    args: model_args (list of `clipsearch serve` flags), num_replicas (int, or "auto"),
    num_gpus and num_cpus per replica, max_ongoing_requests, max_queued_requests (-1 = no
    limit; beyond it callers get RESOURCE_EXHAUSTED), autoscaling_config (instead of
    num_replicas).
    """
    model_args = [str(a) for a in args.get("model_args", [])]
    parse_model_args(model_args, check_files=False)  # a bad flag fails the deploy here
    options: dict[str, Any] = {
        "max_ongoing_requests": int(args.get("max_ongoing_requests",
                                             DEFAULT_MAX_ONGOING_REQUESTS)),
        "max_queued_requests": int(args.get("max_queued_requests", -1)),
        "ray_actor_options": {"num_cpus": float(args.get("num_cpus", 1)),
                              "num_gpus": float(args.get("num_gpus", 0))},
    }
    if args.get("autoscaling_config"):
        options["autoscaling_config"] = dict(args["autoscaling_config"])
    else:
        replicas = args.get("num_replicas", 1)
        options["num_replicas"] = replicas if replicas == "auto" else int(replicas)
    return ClipEncoderDeployment.options(**options).bind(model_args)


def deploy(model_args: list[str], num_replicas: int = 1, num_gpus: float = 0,
           name: str = DEFAULT_APP, **args: Any) -> DeploymentHandle:
    """Run the encoder app on the connected cluster and wait until it is ready (tests, benches).

    Starts Serve without its HTTP proxy when Serve is not running yet: nothing here needs one.
    """
    serve.start(proxy_location="Disabled")
    target = app({"model_args": model_args, "num_replicas": num_replicas,
                  "num_gpus": num_gpus, **args})
    return serve.run(target, name=name, route_prefix=None, blocking=False)
