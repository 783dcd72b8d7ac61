"""The front side of `--encoder ray`: the Encoder protocol over Ray Serve deployment handles.

The model runs in the replicas of a Serve app (ray_deployment.py); this process only sends
inputs and gets vectors back. Calls in flight are capped (`--ray-max-in-flight`): an unbounded
caller floods Serve's router and gets multi-second tails. Calls bigger than one model batch are
split so several replicas share a big upload. Every Ray failure becomes a ClipSearchError, so
the service answers with a status the client can act on rather than INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.exceptions import (
    ActorUnschedulableError,
    GetTimeoutError,
    OutOfMemoryError,
    RayActorError,
    RayError,
    RayTaskError,
    TaskCancelledError,
    WorkerCrashedError,
)
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle

from ..errors import (
    ClipSearchError,
    DeadlineExceeded,
    ModelLoadError,
    ResourceExhausted,
    Unavailable,
)
from ..settings import AnySettings
from .base import Embedded, ModelInfo, TowerTuning

log = logging.getLogger(__name__)

# Failures that mean the replica went away mid-call: worth one retry on another replica.
_REPLICA_GONE = (RayActorError, WorkerCrashedError, OutOfMemoryError, ReplicaUnavailableError)
DEPLOY_HINT = "deploy it with `serve deploy deploy/ray/serve.yaml` (see README: Scaling out)"


class RayEncoder:
    """Encoder whose model runs in the replicas of a Ray Serve app (`--encoder ray`)."""

    # RayEncoders open in this process: Ray's connection is per process, so the last one to
    # close disconnects, and only when connect() was the one that joined the cluster.
    _open = 0
    _joined_by_us = False

    def __init__(self, handle: DeploymentHandle, info: ModelInfo, max_batch_size: int,
                 settings: AnySettings) -> None:
        self.handle = handle
        self.info = info
        self.max_batch_size = max(1, max_batch_size)
        self.address = settings.ray_address
        self.app_name = settings.ray_app
        self.max_in_flight = max(1, settings.ray_max_in_flight)
        self._slots: asyncio.Semaphore | None = None  # bound to the loop that uses it
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        RayEncoder._open += 1

    @classmethod
    def connect(cls, settings: AnySettings, wait_s: float = 60.0) -> RayEncoder:
        """Join the cluster, find the app and ask a replica for its model (blocking).

        Waits up to `wait_s` for an app that is still deploying; raises ModelLoadError, saying
        what to do, when there is no cluster or no such app.
        """
        if not ray.is_initialized():
            RayEncoder._joined_by_us = True
        try:
            ray.init(address=settings.ray_address, ignore_reinit_error=True,
                     logging_level=logging.WARNING, log_to_driver=False,
                     configure_logging=False)
        except Exception as exc:  # ConnectionError, or a bad address
            raise ModelLoadError(
                f"cannot join the Ray cluster at {settings.ray_address!r} ({exc}); start one "
                f"(`ray start --head`) or pass --ray-address, then {DEPLOY_HINT}") from None
        try:
            handle, info, batch = _find_app(settings, wait_s)
        except ModelLoadError:
            if RayEncoder._open == 0 and RayEncoder._joined_by_us:
                RayEncoder._joined_by_us = False
                ray.shutdown()
            raise
        return cls(handle, info, int(batch), settings)

    async def embed_texts(self, texts: list[str], deadline: float | None = None,
                          bulk: bool = False) -> Embedded:
        return await self._embed("embed_texts", texts, deadline, {"bulk": bulk})

    async def embed_images(self, images: list[bytes], deadline: float | None = None,
                           bulk: bool = False, thumbnail_size: int = 0) -> Embedded:
        options: dict[str, Any] = {"bulk": bulk}
        if thumbnail_size:
            options["thumbnail_size"] = thumbnail_size
        return await self._embed("embed_images", images, deadline, options)

    def describe(self) -> str:
        replicas = self.replicas()
        count = "replicas unknown" if replicas is None else f"{replicas} replicas"
        return f"Ray Serve app {self.app_name} at {self.address}, {count}"

    def tuning(self) -> list[TowerTuning]:
        """Each replica measures its own towers; this front has none to report."""
        return []

    def replicas(self) -> int | None:
        """Running replicas of the app's deployment, from Serve's status (None if unknown)."""
        try:
            status = serve.status().applications[self.app_name]
            return sum(d.replica_states.get("RUNNING", 0)
                       for d in status.deployments.values())
        except Exception:
            return None

    def close(self) -> None:
        """Disconnect this front; the cluster and the app keep running for the others."""
        if self._closed:
            return
        self._closed = True
        RayEncoder._open -= 1
        if RayEncoder._open == 0 and RayEncoder._joined_by_us:
            RayEncoder._joined_by_us = False
            ray.shutdown()

    # --- calls ----------------------------------------------------------------------------
    async def _embed(self, method: str, items: list[Any], deadline: float | None,
                     options: dict[str, Any]) -> Embedded:
        """Split into model-batch-sized calls, run them concurrently, put the rows together."""
        if not items:
            return Embedded(np.zeros((0, self.info.dim), dtype=np.float32), {})
        step = self.max_batch_size
        starts = range(0, len(items), step)
        if len(starts) == 1:
            return await self._call(method, items, deadline, options)
        tasks = [asyncio.ensure_future(self._call(method, items[s:s + step], deadline, options))
                 for s in starts]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        errors = {s + i: exc for s, part in zip(starts, parts, strict=True)
                  for i, exc in part.errors.items()}
        thumbnails = ([t for p in parts for t in (p.thumbnails or [None] * len(p.vectors))]
                      if "thumbnail_size" in options else None)
        return Embedded(np.concatenate([p.vectors for p in parts]), errors, thumbnails)

    async def _call(self, method: str, items: list[Any], deadline: float | None,
                    options: dict[str, Any]) -> Embedded:
        """One call to a replica, retried once on another if the replica died under it."""
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots_loop is not loop:
            self._slots, self._slots_loop = asyncio.Semaphore(self.max_in_flight), loop
        send: Callable[..., Any] = getattr(self.handle, method).remote
        async with self._slots:
            try:
                return await self._attempt(send, items, deadline, options)
            except _REPLICA_GONE as exc:
                log.warning("encoder replica lost mid-call (%s); retrying on another",
                            _first_line(exc))
                first = exc
            try:
                return await self._attempt(send, items, deadline, options)
            except _REPLICA_GONE as exc:
                raise Unavailable(
                    f"the encoder replica of Ray Serve app {self.app_name} died mid-request "
                    f"twice ({_first_line(first)}; then {_first_line(exc)}); retry") from None

    async def _attempt(self, send: Callable[..., Any], items: list[Any], deadline: float | None,
                       options: dict[str, Any]) -> Embedded:
        """Send once and map Ray's failures; replica deaths are left for `_call` to retry."""
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("the deadline passed before the encoder was called")
        response = send(items, timeout_s=timeout, **options)
        try:
            return await asyncio.wait_for(_awaited(response), timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise DeadlineExceeded(
                f"the encoder (Ray Serve app {self.app_name}) did not answer before the "
                "deadline") from None
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:
            raise _mapped(exc, self.app_name) from None


def _find_app(settings: AnySettings, wait_s: float) -> tuple[DeploymentHandle, ModelInfo, int]:
    """The app's handle, its model and batch size, once a replica answers (or ModelLoadError)."""
    give_up = time.monotonic() + wait_s
    problem: BaseException | None = None
    while True:
        _raise_if_failed(settings.ray_app)
        try:
            handle = serve.get_app_handle(settings.ray_app)
            # Short waits, so that an app failing to deploy is told by the status check above.
            left = min(5.0, max(1.0, give_up - time.monotonic()))
            info = handle.info.remote().result(timeout_s=left)
            batch = handle.max_batch_size.remote().result(timeout_s=left)
            return handle, info, int(batch)
        except (RayServeException, RayError, TimeoutError) as exc:
            problem = exc
        if time.monotonic() >= give_up:
            raise ModelLoadError(
                f"no ready Ray Serve app {settings.ray_app!r} on the cluster at "
                f"{settings.ray_address!r} after {wait_s:.0f}s ({_first_line(problem)}); "
                f"{DEPLOY_HINT}, or pass --ray-app")
        time.sleep(0.5)


def _raise_if_failed(app_name: str) -> None:
    """An app whose replicas cannot start (a bad checkpoint, say) fails now, with Serve's why."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # status unreachable: the handle call below tells
        return
    if app is None or str(getattr(app.status, "value", app.status)) != "DEPLOY_FAILED":
        return
    # A deployment's message ends with the replica constructor's traceback: its last line
    # (e.g. "ModelLoadError: --precision fp16 needs a GPU") is the reason.
    reasons = [m.strip().splitlines()[-1] for d in app.deployments.values()
               if (m := getattr(d, "message", "")) and m.strip()]
    why = "; ".join(reasons) or app.message.strip()
    raise ModelLoadError(f"the Ray Serve app {app_name!r} failed to deploy: {why[:1000]}; "
                         f"fix it and {DEPLOY_HINT}")


async def _awaited(response: Awaitable[Embedded]) -> Embedded:
    return await response


def _mapped(exc: BaseException, app_name: str) -> BaseException:
    """A Ray or Serve exception as the ClipSearchError a client should see.

    Replica deaths are returned unchanged for the caller's retry.
    """
    if isinstance(exc, RayTaskError):  # raised by the replica's own code: unwrap it
        cause = exc.cause
        if isinstance(cause, ClipSearchError):
            return cause
        if isinstance(cause, _REPLICA_GONE):
            return cause
        return ClipSearchError(f"the encoder replica failed: {_first_line(cause or exc)}")
    if isinstance(exc, (ClipSearchError, *_REPLICA_GONE)):
        return exc
    if isinstance(exc, BackPressureError):
        return ResourceExhausted(f"the encoder (Ray Serve app {app_name}) is overloaded: its "
                                 "request queue is full; retry later")
    if isinstance(exc, GetTimeoutError):
        return DeadlineExceeded(f"the encoder (Ray Serve app {app_name}) did not answer in time")
    if isinstance(exc, DeploymentUnavailableError | ActorUnschedulableError):
        return Unavailable(f"the encoder (Ray Serve app {app_name}) is unavailable "
                           f"({_first_line(exc)}); retry")
    if isinstance(exc, TaskCancelledError):
        return Unavailable(f"the encoder call was cancelled ({_first_line(exc)}); retry")
    if isinstance(exc, RayError | RayServeException | ConnectionError):
        return Unavailable(f"the encoder (Ray Serve app {app_name}) could not be reached "
                           f"({_first_line(exc)}); retry")
    return ClipSearchError(f"the encoder call failed: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip() if exc is not None else ""
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
