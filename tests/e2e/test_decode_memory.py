"""Decoded pixels in flight are bounded: across requests (a budget) and in peak server RSS."""

from __future__ import annotations

import asyncio
import contextlib
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc
from clipsearch_server.config import Settings
from clipsearch_server.encoders.local.decode_budget import DecodeBudget
from clipsearch_server.encoders.local.embedder import Embedder
from clipsearch_server.encoders.local.model import load_model
from clipsearch_server.errors import ResourceExhausted
from conftest import ServerProcess

IMAGES = 4096


def _tiny_pngs(n: int) -> list[bytes]:
    rng = np.random.default_rng(3)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def test_budget_waits_for_room_then_refuses() -> None:
    async def go() -> None:
        budget = DecodeBudget(100, wait_s=0.2)
        async with budget.hold(60):
            with pytest.raises(ResourceExhausted, match="decoding too many images"):
                async with budget.hold(60):
                    pass
            waiter = asyncio.create_task(_hold_briefly(budget, 60))
            await asyncio.sleep(0.05)
            assert not waiter.done()  # waits while the first holds its share
        await waiter
        assert budget.used == 0 and budget.peak == 60  # never both at once
        async with budget.hold(10_000):  # one window larger than the budget still runs alone
            assert budget.used == 100

    asyncio.run(go())


async def _hold_briefly(budget: DecodeBudget, nbytes: int) -> None:
    async with budget.hold(nbytes):
        await asyncio.sleep(0.01)


def test_concurrent_requests_stay_within_the_budget(tiny_checkpoint: Path) -> None:
    model = load_model(Settings(model="clipsearch-tiny", pretrained=None,
                                checkpoint=tiny_checkpoint, device="cpu"))
    embedder = Embedder(model, 16, 10_000_000, 2, max_decoded_bytes=0)
    per_image = embedder.decoded_image_bytes
    embedder.decode_budget = DecodeBudget(3 * 16 * per_image)  # three windows in all
    images = _tiny_pngs(200)

    async def go() -> list:
        return await asyncio.gather(*(embedder.embed_images(images) for _ in range(4)))

    try:
        results = asyncio.run(go())
    finally:
        embedder.close()
    assert all(not r.errors and r.vectors.shape == (200, model.dim) for r in results)
    np.testing.assert_allclose(results[0].vectors, results[3].vectors, atol=1e-5)
    assert embedder.decode_budget.peak <= 3 * 16 * per_image
    assert embedder.decode_budget.used == 0


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def test_peak_rss_of_a_request_of_4096_tiny_pngs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    server = ServerProcess(tiny_checkpoint, tmp_path / "data",
                           "--max-decoded-bytes", str(64 << 20)).start()
    assert server.proc is not None
    pid = server.proc.pid
    images = _tiny_pngs(IMAGES)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ClipSearchServiceStub(channel)
            stub.EmbedImages(pb.EmbedImagesRequest(images=images[:8]))  # warm up
            # start the peak from here (root, Linux >= 4.0); else it includes start-up
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            before = _rss_kib(pid, "VmRSS")

            def call(_: int) -> pb.EmbedImagesResponse:
                return stub.EmbedImages(pb.EmbedImagesRequest(images=images), timeout=600)

            with ThreadPoolExecutor(3) as pool:
                responses = list(pool.map(call, range(3)))
            peak = _rss_kib(pid, "VmHWM")
    finally:
        assert server.stop() == 0, server.log()
    assert all(r.vectors.rows == IMAGES and not r.errors for r in responses)
    grown_mib = (peak - before) / 1024
    # Decoding every image first held 4096 x (3 x 64 x 64 float32) twice over per request,
    # about 400 MB each here (2.5-5 GB at 224 px). Windows and the budget keep it to a few
    # batches in all.
    print(f"peak RSS grew {grown_mib:.0f} MiB over {before / 1024:.0f} MiB for 3 concurrent "
          f"requests of {IMAGES} PNGs ({sum(len(i) for i in images) / 1e3:.0f} kB each)")
    assert grown_mib < 200, grown_mib
