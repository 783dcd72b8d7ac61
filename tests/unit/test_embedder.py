"""The batcher and embedder: cross-request batches, lanes, overload, deadlines, cache."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from clipsearch_server.config import Settings
from clipsearch_server.encoders.local.batcher import BULK, INTERACTIVE, Batcher
from clipsearch_server.encoders.local.embedder import Embedder
from clipsearch_server.encoders.local.model import load_model
from clipsearch_server.errors import DeadlineExceeded, ResourceExhausted
from clipsearch_server.observability import Metrics


class FakeModel:
    """Encodes a text as [len(text), 0, ...]; records batches; can be held."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.release.set()

    def encode(self, texts: list[str]) -> np.ndarray:
        self.release.wait(10)
        self.batches.append(list(texts))
        out = np.zeros((len(texts), 4), np.float32)
        out[:, 0] = [len(t) for t in texts]
        return out


def run(coro):
    return asyncio.run(coro)


def test_concurrent_calls_share_a_batch_and_get_their_own_rows() -> None:
    fake = FakeModel()
    batcher = Batcher({"text": fake.encode}, max_batch=32, max_wait_s=0.05, max_queued=64)

    async def go() -> list[np.ndarray]:
        texts = [["x" * (i + 1)] for i in range(20)]
        return await asyncio.gather(*(batcher.submit("text", t, INTERACTIVE, None)
                                      for t in texts))

    results = run(go())
    batcher.close()
    assert [int(r[0, 0]) for r in results] == list(range(1, 21))
    assert len(fake.batches) < 20  # gathered across calls
    assert max(len(b) for b in fake.batches) > 1


def test_interactive_lane_goes_before_bulk() -> None:
    fake = FakeModel()
    fake.release.clear()
    batcher = Batcher({"text": fake.encode}, max_batch=2, max_wait_s=0, max_queued=64)

    async def go() -> None:
        blocker = asyncio.ensure_future(batcher.submit("text", ["hold"], BULK, None))
        await asyncio.sleep(0.05)  # the worker is now inside encode(["hold"])
        bulk = [asyncio.ensure_future(batcher.submit("text", [f"b{i}", f"b{i}"], BULK, None))
                for i in range(3)]
        await asyncio.sleep(0.01)
        query = asyncio.ensure_future(batcher.submit("text", ["query"], INTERACTIVE, None))
        await asyncio.sleep(0.01)
        fake.release.set()
        await asyncio.gather(blocker, query, *bulk)

    run(go())
    batcher.close()
    assert fake.batches[0] == ["hold"]
    assert fake.batches[1] == ["query"]  # ahead of the bulk work queued before it


def test_expired_work_never_reaches_the_model() -> None:
    fake = FakeModel()
    metrics = Metrics()
    batcher = Batcher({"text": fake.encode}, 8, 0.0, 64, metrics)

    async def go() -> None:
        with pytest.raises(DeadlineExceeded):
            await batcher.submit("text", ["late"], INTERACTIVE, time.monotonic() - 0.001)
        await batcher.submit("text", ["on time"], INTERACTIVE, time.monotonic() + 60)

    run(go())
    batcher.close()
    assert fake.batches == [["on time"]]
    assert metrics.registry.get_sample_value(
        "clipsearch_model_batch_size_count", {"modality": "text"}) == 1


def test_a_full_queue_refuses_at_once() -> None:
    fake = FakeModel()
    fake.release.clear()
    batcher = Batcher({"text": fake.encode}, 1, 0.0, max_queued=2)

    async def go() -> None:
        running = asyncio.ensure_future(batcher.submit("text", ["a"], BULK, None))
        await asyncio.sleep(0.05)  # taken by the worker: no longer queued
        queued = [asyncio.ensure_future(batcher.submit("text", [t], BULK, None))
                  for t in ("b", "c")]
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(ResourceExhausted, match="overloaded"):
            await batcher.submit("text", ["d"], INTERACTIVE, None)
        assert time.perf_counter() - started < 0.5
        fake.release.set()
        await asyncio.gather(running, *queued)
        await batcher.submit("text", ["e"], INTERACTIVE, None)  # recovered

    run(go())
    batcher.close()
    assert [b[0] for b in fake.batches] == ["a", "b", "c", "e"]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(Settings(model="clipsearch-tiny", pretrained=None,
                               checkpoint=tiny_checkpoint, device="cpu"))


def test_repeated_query_texts_come_from_the_cache(model) -> None:
    metrics = Metrics()
    embedder = Embedder(model, 8, 10_000_000, 1, metrics=metrics)

    async def go() -> tuple:
        first = await embedder.embed_texts(["a dog", "a cat"])
        second = await embedder.embed_texts(["a cat", "a bird"])
        return first, second

    first, second = run(go())
    embedder.close()
    np.testing.assert_array_equal(first.vectors[1], second.vectors[0])
    np.testing.assert_allclose(second.vectors, model.encode_texts(["a cat", "a bird"]),
                               atol=1e-6)
    inputs = metrics.registry.get_sample_value(
        "clipsearch_model_batch_size_sum", {"modality": "text"})
    assert inputs == 3  # "a cat" was not embedded twice


@pytest.mark.parametrize("max_call_s", [0.0, 60.0])
def test_a_running_bulk_batch_lets_a_query_through_between_its_calls(max_call_s: float) -> None:
    """A bulk batch runs as calls of about max_call_s (sized by the measured cost per input):
    a query that arrives while one runs is served before the next, not after the whole batch.
    max_call_s 0 runs batches whole, the old behaviour."""
    fake = FakeModel()
    fake.release.clear()
    batcher = Batcher({"text": fake.encode}, max_batch=8, max_wait_s=0, max_queued=64,
                      max_call_s=max_call_s)
    batcher._seconds_per_input["text"] = 30.0  # measured: 2 inputs (a power of two) fit 60 s

    async def go() -> np.ndarray:
        bulk = asyncio.ensure_future(batcher.submit("text", [f"b{i}" * i for i in range(8)],
                                                    BULK, None))
        await asyncio.sleep(0.05)  # the worker is now inside its first call
        query = asyncio.ensure_future(batcher.submit("text", ["query"], INTERACTIVE, None))
        await asyncio.sleep(0.01)
        fake.release.set()
        await query
        return await bulk

    vectors = run(go())
    batcher.close()
    assert [int(v) for v in vectors[:, 0]] == [len(f"b{i}" * i) for i in range(8)]
    if max_call_s:
        sizes = [len(b) for b in fake.batches]
        assert sizes[0] == 2 and fake.batches[1] == ["query"]  # served after the first call
        assert sum(sizes[2:]) == 6  # then the rest of the bulk batch
    else:
        assert [len(b) for b in fake.batches] == [8, 1]


def test_call_size_follows_the_measured_cost() -> None:
    batcher = Batcher({"text": FakeModel().encode}, max_batch=64, max_wait_s=0, max_queued=4,
                      max_call_s=0.1)
    assert batcher.call_size("text") == 4  # not measured yet: a small call measures it
    batcher._seconds_per_input["text"] = 0.025
    assert batcher.call_size("text") == 4
    batcher._seconds_per_input["text"] = 0.015  # 6.7 fit: the nearest power of two
    assert batcher.call_size("text") == 8
    batcher._seconds_per_input["text"] = 0.028  # 3.6 fit: 4, not 2
    assert batcher.call_size("text") == 4
    batcher._seconds_per_input["text"] = 0.04  # 2.5 fit: 2
    assert batcher.call_size("text") == 2
    batcher._seconds_per_input["text"] = 1.0
    assert batcher.call_size("text") == 1
    batcher._seconds_per_input["text"] = 1e-6
    assert batcher.call_size("text") == 64
    batcher.max_call_s = 0
    batcher._seconds_per_input["text"] = 1.0
    assert batcher.call_size("text") == 64
    batcher.close()
