"""RayEncoder against a real local Ray cluster: the same vectors as the in-process encoder,
per-item errors at the right rows, and every Ray failure mapped to a ClipSearchError.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from ray_cluster import RayCluster, tiny_model_args

from clipsearch_server.config import parse_settings
from clipsearch_server.encoders.base import Embedded
from clipsearch_server.encoders.local import LocalEncoder
from clipsearch_server.encoders.ray_serve import RayEncoder
from clipsearch_server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ModelLoadError,
    ResourceExhausted,
    Unavailable,
)
from conftest import RAY_APP, RAY_TIGHT_APP, coco_images

APP, TIGHT = RAY_APP, RAY_TIGHT_APP  # deployed by conftest's session cluster


# One event loop for the module, as in the service: the encoders keep loop-bound locks.
_LOOP = asyncio.new_event_loop()


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return _LOOP.run_until_complete(coro)


@pytest.fixture(scope="module", autouse=True)
def _close_loop() -> Iterator[None]:
    yield
    _LOOP.close()


@pytest.fixture(scope="module")
def cluster(ray_cluster: RayCluster) -> RayCluster:
    return ray_cluster


def _connect(cluster: RayCluster, app: str) -> RayEncoder:
    return RayEncoder.connect(parse_settings(["--encoder", "ray", "--ray-address",
                                              cluster.address, "--ray-app", app]))


@pytest.fixture(scope="module")
def encoder(cluster: RayCluster) -> Iterator[RayEncoder]:
    enc = _connect(cluster, APP)
    yield enc
    enc.close()


@pytest.fixture(scope="module")
def tight(cluster: RayCluster, encoder: RayEncoder) -> Iterator[RayEncoder]:
    enc = _connect(cluster, TIGHT)
    yield enc
    enc.close()


@pytest.fixture(scope="module")
def local(tiny_checkpoint: Path) -> Iterator[LocalEncoder]:
    enc = LocalEncoder.start(parse_settings(tiny_model_args(tiny_checkpoint, "--no-jpeg-draft")))
    yield enc
    enc.close()


def assert_same(got: Embedded, want: Embedded) -> None:
    assert got.vectors.shape == want.vectors.shape
    assert got.errors.keys() == want.errors.keys()
    for i, exc in want.errors.items():
        assert type(got.errors[i]) is type(exc) and str(got.errors[i]) == str(exc)
    np.testing.assert_allclose(got.vectors, want.vectors, atol=1e-5, rtol=0)


def test_model_info_and_describe(encoder: RayEncoder, local: LocalEncoder) -> None:
    assert encoder.info.fingerprint == local.info.fingerprint
    assert encoder.info.dim == local.info.dim and encoder.info.precision == "fp32"
    assert encoder.describe() == f"Ray Serve app {APP} at {encoder.address}, 2 replicas"


def test_texts_match_local_with_errors_in_place(encoder: RayEncoder, local: LocalEncoder
                                                ) -> None:
    texts = ["a photo of a cat", "two dogs on a beach", "   ", "a red bus", "x" * 10_001]
    got = run(encoder.embed_texts(texts))
    assert set(got.errors) == {2, 4} and isinstance(got.errors[2], InvalidArgument)
    assert_same(got, run(local.embed_texts(texts)))


def test_images_match_local_with_errors_in_place(encoder: RayEncoder, local: LocalEncoder
                                                 ) -> None:
    images = [p.read_bytes() for p in coco_images(5)]
    images.insert(3, b"this is not an image")
    got = run(encoder.embed_images(images))
    assert set(got.errors) == {3} and isinstance(got.errors[3], InvalidArgument)
    assert np.count_nonzero(np.linalg.norm(got.vectors, axis=1) > 0.99) == 5
    assert_same(got, run(local.embed_images(images)))


def test_big_calls_are_split_and_keep_their_rows(encoder: RayEncoder, local: LocalEncoder
                                                 ) -> None:
    assert encoder.max_batch_size == 64
    texts = [f"picture number {i}" for i in range(150)]
    for i in (0, 64, 70, 149):
        texts[i] = ""
    got = run(encoder.embed_texts(texts, bulk=True))
    assert set(got.errors) == {0, 64, 70, 149}
    assert_same(got, run(local.embed_texts(texts, bulk=True)))
    photos = [p.read_bytes() for p in coco_images(20)]
    images = [photos[i % len(photos)] for i in range(130)]
    images[65] = images[129] = b"\xff\xd8 truncated"
    got = run(encoder.embed_images(images, bulk=True))
    assert set(got.errors) == {65, 129}
    assert_same(got, run(local.embed_images(images, bulk=True)))


def test_both_replicas_receive_work(encoder: RayEncoder) -> None:
    run(encoder.embed_texts([f"spread {i}" for i in range(512)], bulk=True))
    seen: dict[str, int] = {}
    for _ in range(60):  # the router picks replicas at random: ask until both have answered
        stats = encoder.handle.stats.remote().result(timeout_s=10)
        seen[stats["replica"]] = stats["items"]
        if len(seen) == 2:
            break
    assert len(seen) == 2 and all(items > 0 for items in seen.values()), seen


def test_deadline_exceeded(encoder: RayEncoder) -> None:
    with pytest.raises(DeadlineExceeded):
        run(encoder.embed_texts(["late"], deadline=time.monotonic() - 1))
    images = [p.read_bytes() for p in coco_images(20)] * 10
    with pytest.raises(DeadlineExceeded):
        run(encoder.embed_images(images, deadline=time.monotonic() + 0.05))


def test_replica_error_keeps_its_type_and_message(tight: RayEncoder) -> None:
    tight.max_batch_size = 64  # one call of many model batches: overflows the replica's queue
    with pytest.raises(ResourceExhausted, match=r"^server overloaded: \d+ model batches queued"):
        run(tight.embed_texts([f"overload {i} {time.time()}" for i in range(40)]))


def test_serve_backpressure_is_resource_exhausted(tight: RayEncoder) -> None:
    async def burst() -> list[Any]:
        return await asyncio.gather(*(tight.embed_texts([f"burst {i} {time.time()}"])
                                      for i in range(12)), return_exceptions=True)

    results = run(burst())
    refused = [r for r in results if isinstance(r, BaseException)]
    assert refused and all(isinstance(r, ResourceExhausted) for r in refused), refused
    assert any("request queue is full" in str(r) for r in refused)
    assert any(isinstance(r, Embedded) for r in results)


def test_missing_app_says_how_to_deploy(cluster: RayCluster, encoder: RayEncoder) -> None:
    settings = parse_settings(["--encoder", "ray", "--ray-address", cluster.address,
                               "--ray-app", "no-such-app"])
    with pytest.raises(ModelLoadError, match=r"serve deploy deploy/ray/serve\.yaml"):
        RayEncoder.connect(settings, wait_s=2)
    assert ray.is_initialized()  # the module's encoder is still connected


def test_replica_killed_mid_request(encoder: RayEncoder, local: LocalEncoder) -> None:
    photos = [p.read_bytes() for p in coco_images(20)]
    images = [photos[i % len(photos)] for i in range(512)]
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{APP}#")]
    assert len(replicas) == 2, replicas

    async def kill_during_call() -> Embedded | BaseException:
        call = asyncio.ensure_future(encoder.embed_images(images, bulk=True))
        await asyncio.sleep(0.4)
        assert not call.done()
        victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
        ray.kill(victim, no_restart=True)
        try:
            return await call
        except Exception as exc:
            return exc

    result = run(kill_during_call())
    if isinstance(result, Embedded):
        assert_same(result, run(local.embed_images(images, bulk=True)))
    else:
        assert isinstance(result, Unavailable) and str(result).endswith("retry"), repr(result)
