"""The embedder's overload and deadline behaviour, with the real tiny model in-process."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from clipsearch_server.config import Settings
from clipsearch_server.embedder import Embedder
from clipsearch_server.errors import DeadlineExceeded, ResourceExhausted
from clipsearch_server.model import load_model
from clipsearch_server.observability import Metrics


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(Settings(model="clipsearch-tiny", pretrained=None,
                               checkpoint=tiny_checkpoint, device="cpu"))


def test_expired_work_never_reaches_the_model(model) -> None:
    metrics = Metrics()
    embedder = Embedder(model, 8, 10_000_000, 1, metrics=metrics)
    calls: list[int] = []

    def encode(batch: list[str]) -> np.ndarray:
        calls.append(len(batch))
        return model.encode_texts(batch)

    async def run() -> None:
        with pytest.raises(DeadlineExceeded):
            await embedder._run_model(encode, ["a dog"], "text", time.monotonic() - 0.001)
        vectors = await embedder._run_model(encode, ["a dog"], "text", time.monotonic() + 60)
        assert vectors.shape == (1, 64)

    asyncio.run(run())
    embedder.close()
    assert calls == [1]  # only the live call ran
    assert metrics.registry.get_sample_value(
        "clipsearch_model_batch_size_count", {"modality": "text"}) == 1


def test_a_full_queue_refuses_at_once(model) -> None:
    embedder = Embedder(model, 8, 10_000_000, 1, max_queued_batches=2)
    release = threading.Event()

    def slow(batch: list[str]) -> np.ndarray:
        release.wait(10)
        return model.encode_texts(batch)

    async def run() -> None:
        first = asyncio.ensure_future(embedder._run_model(slow, ["a"], "text", None))
        second = asyncio.ensure_future(embedder._run_model(slow, ["b"], "text", None))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        with pytest.raises(ResourceExhausted, match="overloaded"):
            await embedder.embed_texts(["c"])
        assert time.perf_counter() - started < 0.5
        release.set()
        assert (await first).shape == (1, 64) and (await second).shape == (1, 64)
        assert (await embedder.embed_texts(["c"])).vectors.shape == (1, 64)  # recovered

    asyncio.run(run())
    embedder.close()
