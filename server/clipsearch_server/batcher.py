"""Cross-request micro-batching in front of the model, with two lanes.

Concurrent calls put their inputs on a queue; one model thread takes as many as fit in a
batch (`max_batch` inputs of one modality), waiting up to `max_wait_s` for more when the
batch is not full, and runs them through the model together. Interactive work (search
queries, small embed calls) has its own lane that is always served first, so a query is never
stuck behind a bulk ingest. The queue is bounded: when `max_queued` jobs wait, a new one is
refused at once with RESOURCE_EXHAUSTED. A job whose deadline has passed, or whose caller went
away, is dropped before it reaches the model.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import DeadlineExceeded, ResourceExhausted, Unavailable
from .observability import Metrics

log = logging.getLogger(__name__)

INTERACTIVE = "interactive"
BULK = "bulk"
Encoder = Callable[[Any], np.ndarray]


@dataclass
class _Job:
    modality: str
    items: list[str] | torch.Tensor
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    deadline: float | None

    def __len__(self) -> int:
        return len(self.items)


class Batcher:
    """Gathers inputs from concurrent calls into model batches on one worker thread."""

    def __init__(self, encoders: dict[str, Encoder], max_batch: int, max_wait_s: float,
                 max_queued: int, metrics: Metrics | None = None) -> None:
        self._encoders = encoders
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queued = max_queued
        self.metrics = metrics
        self._lanes: dict[str, collections.deque[_Job]] = {
            INTERACTIVE: collections.deque(), BULK: collections.deque()}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="clipsearch-model", daemon=True)
        self._thread.start()

    def queued(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    async def submit(self, modality: str, items: list[str] | torch.Tensor, lane: str,
                     deadline: float | None) -> np.ndarray:
        """Embed up to max_batch inputs; resolves when their batch has run."""
        if len(items) > self.max_batch:
            raise ValueError(f"{len(items)} inputs, over the batch size {self.max_batch}")
        loop = asyncio.get_running_loop()
        job = _Job(modality, items, loop.create_future(), loop, deadline)
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down")
            if self.queued() >= self.max_queued:
                raise ResourceExhausted(
                    f"server overloaded: {self.queued()} model batches queued; retry later")
            self._lanes[lane].append(job)
            self._gauge()
            self._cond.notify()
        return await job.future

    def close(self) -> None:
        """Finish the batch in progress, refuse what is still queued, stop the thread."""
        with self._cond:
            self._closed = True
            left = [job for lane in self._lanes.values() for job in lane]
            for lane in self._lanes.values():
                lane.clear()
            self._cond.notify_all()
        for job in left:
            _resolve(job, error=Unavailable("the server is shutting down"))
        self._thread.join(timeout=60)

    # --- the model thread ------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Job] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self.queued() > 0)
            if self._closed:
                return None
            lane = self._lanes[INTERACTIVE] if self._lanes[INTERACTIVE] else self._lanes[BULK]
            modality = lane[0].modality
            batch: list[_Job] = []
            size = 0
            give_up = time.monotonic() + self.max_wait_s
            while True:
                size = self._take(lane, modality, batch, size)
                remaining = give_up - time.monotonic()
                if size >= self.max_batch or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            self._gauge()
            return batch

    def _take(self, lane: collections.deque[_Job], modality: str, batch: list[_Job],
              size: int) -> int:
        """Move jobs of `modality` that fit from the lane into the batch, in order."""
        kept: list[_Job] = []
        while lane:
            job = lane.popleft()
            if job.modality == modality and size + len(job) <= self.max_batch:
                batch.append(job)
                size += len(job)
            else:
                kept.append(job)
                if job.modality == modality:
                    break  # keep arrival order within a modality
        lane.extendleft(reversed(kept))
        return size

    def _run(self, batch: list[_Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            if job.future.cancelled():
                continue
            if job.deadline is not None and now > job.deadline:
                _resolve(job, error=DeadlineExceeded(
                    "the call's deadline passed before its batch reached the model"))
                continue
            live.append(job)
        if not live:
            return
        modality = live[0].modality
        inputs: list[str] | torch.Tensor = (
            [text for job in live for text in job.items] if modality == "text"
            else torch.cat([job.items for job in live]))
        if self.metrics is not None:
            self.metrics.batch_size.labels(modality).observe(len(inputs))
        try:
            vectors = self._encoders[modality](inputs)
        except Exception as exc:
            log.exception("model batch of %d %s inputs failed", len(inputs), modality)
            for job in live:
                _resolve(job, error=exc)
            return
        start = 0
        for job in live:
            _resolve(job, result=vectors[start:start + len(job)])
            start += len(job)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queued())


def _resolve(job: _Job, result: np.ndarray | None = None,
             error: BaseException | None = None) -> None:
    """Complete a job's future on its own event loop (futures are not thread-safe)."""

    def complete() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
        job.loop.call_soon_threadsafe(complete)
