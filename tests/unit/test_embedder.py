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
from conftest import coco_images


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
    """On a modality that cannot pause mid-call, a bulk batch runs as calls kept within
    max_call_s (sized by the measured cost per input): a query that arrives while one runs is
    served before the next, not after the whole batch. max_call_s 0 runs batches whole."""
    fake = FakeModel()
    fake.release.clear()
    batcher = Batcher({"text": fake.encode}, max_batch=8, max_wait_s=0, max_queued=64,
                      max_call_s=max_call_s)
    batcher._cost[("text", 2)] = 30.0  # measured: 2 inputs (a power of two) fit 60 s

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


def _measured(batcher: Batcher, costs: dict[int, float], modality: str = "text") -> None:
    batcher._cost = {(modality, size): cost for size, cost in costs.items()}


def test_call_size_doubles_while_it_pays_and_keeps_the_smallest_fastest() -> None:
    batcher = Batcher({"text": FakeModel().encode}, max_batch=64, max_wait_s=0, max_queued=4,
                      max_call_s=100.0)
    assert batcher.call_size("text") == 4  # nothing measured: a small call measures it
    _measured(batcher, {4: 1.0})
    assert batcher.call_size("text") == 8  # bigger may be faster: try it
    _measured(batcher, {4: 1.0, 8: 0.8})
    assert batcher.call_size("text") == 16
    _measured(batcher, {4: 1.0, 8: 0.8, 16: 0.79})  # 16 is not worth it: 8
    assert batcher.call_size("text") == 8
    _measured(batcher, {4: 1.0, 8: 1.2})  # 8 is slower: stay at 4, stop exploring
    assert batcher.call_size("text") == 4
    _measured(batcher, {4: 1.0, 8: 0.5, 16: 0.3, 32: 0.2, 64: 0.1})
    assert batcher.call_size("text") == 64  # never past max_batch
    batcher.max_call_s = 0
    assert batcher.call_size("text") == 64  # whole batches, as asked
    batcher.close()


def test_a_call_that_cannot_pause_is_kept_within_max_call_s() -> None:
    batcher = Batcher({"text": FakeModel().encode}, max_batch=64, max_wait_s=0, max_queued=4,
                      max_call_s=0.1)
    _measured(batcher, {4: 0.02, 8: 0.01})  # 8 is faster, but 16 x 0.01 would be 160 ms
    assert batcher.call_size("text") == 8
    _measured(batcher, {4: 0.03, 8: 0.02})  # 8 x 0.02 is over 100 ms: the quick one
    assert batcher.call_size("text") == 4
    _measured(batcher, {4: 1.0})  # nothing fits: the smallest measured, not a smaller one
    assert batcher.call_size("text") == 4
    batcher.pausable = frozenset({"text"})  # a pausable call is bounded by its blocks
    _measured(batcher, {4: 1.0, 8: 0.8})
    assert batcher.call_size("text") == 16
    tuning = batcher.tuning()[0]  # the fastest measured so far, and what is being tried
    assert (tuning.batch_size, tuning.inputs_per_second) == (8, 1 / 0.8)
    assert tuning.reason == ("ms per input by batch size {4: 1000.0, 8: 800.0}; queries "
                             "served between the call's blocks; trying 16 next")
    batcher.close()


def test_a_query_is_served_inside_a_pausable_bulk_call() -> None:
    """A pausable encoder calls `between` at its pause points; a query that arrives while a
    bulk call runs is answered there, before the call ends, and that time is not counted as
    the call's cost."""
    order: list[str] = []
    started, query_in = threading.Event(), threading.Event()

    def encode_bulk(items: list[str], between=None) -> np.ndarray:
        order.append(f"bulk {len(items)} starts")
        if between is not None:
            started.set()
            query_in.wait(10)
            time.sleep(0.02)  # the query reached the lane
            between()
        order.append("bulk ends")
        return np.ones((len(items), 4), np.float32)

    def encode(items: list[str], between=None) -> np.ndarray:
        if items[0] == "query":
            order.append("query")
            time.sleep(0.2)  # a slow query: its time must not be billed to the bulk call
            return np.zeros((1, 4), np.float32)
        return encode_bulk(items, between)

    batcher = Batcher({"text": encode}, max_batch=8, max_wait_s=0, max_queued=64,
                      max_call_s=0.001, pausable=frozenset({"text"}))
    batcher._sizes_seen.add(("text", 4))  # a size seen before: this call is measured

    async def go() -> None:
        bulk = asyncio.ensure_future(batcher.submit("text", ["b"] * 4, BULK, None))
        await asyncio.to_thread(started.wait, 10)
        query = asyncio.ensure_future(batcher.submit("text", ["query"], INTERACTIVE, None))
        await asyncio.sleep(0.01)
        query_in.set()
        await query
        await bulk

    run(go())
    batcher.close()
    assert order == ["bulk 4 starts", "query", "bulk ends"]
    assert batcher._cost[("text", 4)] < 0.2 / 4  # the query's time was left out


def test_pause_points_change_nothing_in_the_image_embeddings(model) -> None:
    """The image tower's hooks call `between` after each residual block but the last, and
    the vectors are the same with and without them."""
    import torch

    assert model.pausable
    pixels = torch.randn(3, 3, model.image_size, model.image_size)
    calls: list[int] = []
    paused = model.encode_images(pixels, between=lambda: calls.append(1))
    plain = model.encode_images(pixels)
    np.testing.assert_array_equal(paused, plain)
    assert len(calls) == len(model.module.visual.transformer.resblocks) - 1


def test_thumbnails_come_from_the_picture_decoded_for_the_model(
        model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ingest decodes each image once: the thumbnail is made from the model's decode, and it
    matches the thumbnail made from the bytes on their own (same size, near-same pixels)."""
    import io

    from PIL import Image

    from clipsearch_server.encoders.local import preprocess
    from clipsearch_server.thumbnails import make_thumbnail

    datas = [f.read_bytes() for f in coco_images(6)] + [b"not an image"]
    decodes = []
    real = preprocess.decode_image
    monkeypatch.setattr(preprocess, "decode_image",
                        lambda *a, **k: decodes.append(1) or real(*a, **k))
    embedder = Embedder(model, 4, 40_000_000, 1)
    embedded = run(embedder.embed_images(datas, bulk=True, thumbnail_size=256))
    plain = run(embedder.embed_images(datas[:2], bulk=True))
    embedder.close()
    assert len(decodes) == len(datas) + 2  # one per image, thumbnails or not
    assert plain.thumbnails is None
    assert embedded.thumbnails is not None and embedded.thumbnails[-1] is None
    assert set(embedded.errors) == {len(datas) - 1}
    for data, thumbnail in zip(datas[:-1], embedded.thumbnails, strict=False):
        assert thumbnail is not None
        ours = np.asarray(Image.open(io.BytesIO(thumbnail)).convert("RGB"), np.float32)
        alone = np.asarray(Image.open(io.BytesIO(make_thumbnail(data, 256, 40_000_000)))
                           .convert("RGB"), np.float32)
        assert ours.shape == alone.shape and max(ours.shape[:2]) == 256
        assert np.abs(ours - alone).mean() < 3.0  # of 255: resampling and WebP rounding
