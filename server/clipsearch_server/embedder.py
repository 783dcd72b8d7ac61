"""Texts and encoded images -> unit vectors, with per-item errors, off the event loop.

Image decoding runs in a thread pool (Pillow releases the GIL while decoding and resizing);
the model runs in one dedicated thread per device so that torch's own threads are not
oversubscribed and GPU work stays in order. One bad item is reported for that item only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import ClipSearchError, DeadlineExceeded, InvalidArgument, ResourceExhausted
from .model import ClipModel
from .observability import Metrics
from .preprocess import ImagePreprocessor

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    """A batch's vectors (failed rows are zero) and the errors of the rows that failed."""

    vectors: np.ndarray
    errors: dict[int, ClipSearchError]


class Embedder:
    """Runs preprocessing and the model for the service.

    Model batches wait in the model thread's queue; when `max_queued_batches` are already
    waiting, new work is refused at once with RESOURCE_EXHAUSTED instead of queueing without
    bound. A batch whose callers' deadline has passed by the time it reaches the model is
    dropped, not computed.
    """

    def __init__(self, model: ClipModel, max_batch_size: int, max_image_pixels: int,
                 decode_threads: int, max_queued_batches: int = 64,
                 metrics: Metrics | None = None, max_text_chars: int = 10_000) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_text_chars = max_text_chars
        self.max_queued_batches = max_queued_batches
        self.metrics = metrics
        self.preprocess = ImagePreprocessor(model.transform, max_image_pixels)
        self._queued = 0
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="clipsearch-model")
        self._decode_pool = ThreadPoolExecutor(decode_threads,
                                               thread_name_prefix="clipsearch-decode")

    @property
    def dim(self) -> int:
        return self.model.dim

    def close(self) -> None:
        self._decode_pool.shutdown(wait=True, cancel_futures=True)
        self._model_thread.shutdown(wait=True, cancel_futures=True)

    async def embed_texts(self, texts: list[str], deadline: float | None = None) -> Embedded:
        """Embed texts; `deadline` is a time.monotonic() after which the work is dropped."""
        errors: dict[int, ClipSearchError] = {}
        good: list[int] = []
        for i, text in enumerate(texts):
            if not text.strip():
                errors[i] = InvalidArgument("text is empty")
            elif len(text) > self.max_text_chars:
                errors[i] = InvalidArgument(
                    f"text is {len(text)} characters, over the limit of {self.max_text_chars}")
            else:
                good.append(i)
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(good), self.max_batch_size):
            rows = good[start:start + self.max_batch_size]
            vectors[rows] = await self._run_model(
                self.model.encode_texts, [texts[i] for i in rows], "text", deadline)
        return Embedded(vectors, errors)

    async def embed_images(self, images: list[bytes], deadline: float | None = None
                           ) -> Embedded:
        """Decode and embed images; undecodable ones are reported per item."""
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(self._decode_pool, self._preprocess_one, data)
              for data in images))
        errors = {i: d for i, d in enumerate(decoded) if isinstance(d, ClipSearchError)}
        good = [i for i, d in enumerate(decoded) if not isinstance(d, ClipSearchError)]
        vectors = np.zeros((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(good), self.max_batch_size):
            rows = good[start:start + self.max_batch_size]
            pixels = torch.stack([decoded[i] for i in rows])
            vectors[rows] = await self._run_model(
                self.model.encode_images, pixels, "image", deadline)
        return Embedded(vectors, errors)

    async def _run_model(self, encode: Callable[[Any], np.ndarray], batch: Any, modality: str,
                         deadline: float | None) -> np.ndarray:
        if self._queued >= self.max_queued_batches:
            raise ResourceExhausted(
                f"server overloaded: {self._queued} model batches queued; retry later")
        self._queued += 1
        self._gauge()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._model_thread, self._encode, encode, batch, modality, deadline)
        finally:
            self._queued -= 1
            self._gauge()

    def _encode(self, encode: Callable[[Any], np.ndarray], batch: Any, modality: str,
                deadline: float | None) -> np.ndarray:
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("the call's deadline passed before its batch reached the model")
        if self.metrics is not None:
            self.metrics.batch_size.labels(modality).observe(len(batch))
        return encode(batch)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queued)

    def _preprocess_one(self, data: bytes) -> torch.Tensor | ClipSearchError:
        try:
            return self.preprocess(data)
        except ClipSearchError as exc:
            return exc
        except Exception as exc:  # a decoder bug must not fail the neighbours
            log.warning("image preprocessing failed: %r", exc)
            return InvalidArgument(f"image could not be processed: {exc}")
