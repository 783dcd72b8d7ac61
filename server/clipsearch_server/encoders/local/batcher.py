"""Cross-request micro-batching in front of the model, with two lanes.

Concurrent calls put their inputs on a queue; one model thread takes as many as fit in a
batch (`max_batch` inputs of one modality), waiting up to `max_wait_s` for more when the
batch is not full, and runs them through the model together. Interactive work (search
queries, small embed calls) has its own lane that is always served first, so a query is never
stuck behind a bulk ingest.

A bulk batch runs as model calls of the size this machine runs fastest, found by measuring as
it runs (no size is tuned for one CPU): the cost per input of each power-of-two size is kept,
and the size doubles while doing so still pays (`_GAIN`). A query that arrives mid-call:
- on a pausable modality (a ViT image tower, model.py) is served between two of the call's
  residual blocks, so it waits for one block, whatever the batch size;
- otherwise waits for the call, so there calls are also kept near `max_call_s` when the
  measurements allow (on a 2-core CPU, 64 ViT-B-32 images are 1-3 s).
The queue is bounded:
when `max_queued` jobs wait, a new one is refused at once with RESOURCE_EXHAUSTED. A job whose
deadline has passed, or whose caller went away, is dropped before it reaches the model.
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

import numpy as np
import torch

from ...errors import DeadlineExceeded, ResourceExhausted, Unavailable
from ...observability import Metrics
from ..base import TowerTuning

log = logging.getLogger(__name__)

INTERACTIVE = "interactive"
BULK = "bulk"
DEFAULT_MAX_CALL_S = 0.1
FIRST_CALL = 4  # inputs in a bulk modality's first call, before its cost is measured
_COST_SMOOTHING = 0.3  # weight of the newest measurement in the cost per input
# A doubled batch is kept only when it costs at least this much less per input.
_GAIN = 0.05
Encoder = Callable[..., np.ndarray]


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
                 max_queued: int, metrics: Metrics | None = None,
                 max_call_s: float = DEFAULT_MAX_CALL_S,
                 pausable: frozenset[str] = frozenset()) -> None:
        self._encoders = encoders
        # Modalities whose encoder takes `between=`, a callback run at pause points mid-call.
        self.pausable = pausable
        self._serving_between = False
        self._between_s = 0.0  # all the time spent serving queries at pause points, so far
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queued = max_queued
        self.metrics = metrics
        # Longest model call a bulk batch may make before interactive work gets a turn; 0 runs
        # bulk batches whole. Read on every bulk batch, so it can be changed while running.
        self.max_call_s = max_call_s
        # Cost per input of each (modality, batch size) measured, a moving average.
        self._cost: dict[tuple[str, int], float] = {}
        # Batch sizes each modality has run. A CPU backend (oneDNN) prepares its kernels per
        # input shape on first use, which is slow, so a size's first call is not measured, and
        # bulk calls come in powers of two so that few shapes ever need preparing.
        self._sizes_seen: set[tuple[str, int]] = set()
        self._announced: dict[str, int] = {}  # the size last logged per modality
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
            taken = self._next_batch()
            if taken is None:
                return
            self._run(*taken)

    def _next_batch(self) -> tuple[list[_Job], str] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self.queued() > 0)
            if self._closed:
                return None
            name = INTERACTIVE if self._lanes[INTERACTIVE] else BULK
            lane = self._lanes[name]
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
            return batch, name

    def _serve_interactive(self) -> None:
        """Run what waits in the interactive lane now (between a bulk batch's calls)."""
        while True:
            with self._cond:
                lane = self._lanes[INTERACTIVE]
                if self._closed or not lane:
                    return
                batch: list[_Job] = []
                self._take(lane, lane[0].modality, batch, 0)
                self._gauge()
            self._run(batch, INTERACTIVE)

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

    def _run(self, batch: list[_Job], lane: str) -> None:
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
            vectors = (self._encode_in_calls(modality, inputs) if lane == BULK
                       else self._encode(modality, inputs))
        except Exception as exc:
            log.exception("model batch of %d %s inputs failed", len(inputs), modality)
            for job in live:
                _resolve(job, error=exc)
            return
        start = 0
        for job in live:
            _resolve(job, result=vectors[start:start + len(job)])
            start += len(job)

    def _encode(self, modality: str, inputs: list[str] | torch.Tensor,
                pause: bool = False) -> np.ndarray:
        """One model call, timed: its cost per input sizes the bulk calls that follow.

        With `pause`, the encoder serves waiting queries at its pause points; that time is
        theirs, not the call's, and is left out of the measurement.
        """
        paused_before = self._between_s
        started = time.perf_counter()
        if pause:
            vectors = self._encoders[modality](inputs, between=self._serve_between)
        else:
            vectors = self._encoders[modality](inputs)
        paused = self._between_s - paused_before
        cost = (time.perf_counter() - started - paused) / max(1, len(inputs))
        shape = (modality, len(inputs))
        if shape in self._sizes_seen:
            old = self._cost.get(shape)
            self._cost[shape] = cost if old is None else old + _COST_SMOOTHING * (cost - old)
        else:
            self._sizes_seen.add(shape)
        return vectors

    def _serve_between(self) -> None:
        """A pause point inside a bulk call: serve the interactive lane, once, not nested."""
        if self._serving_between or not self._lanes[INTERACTIVE]:
            return
        self._serving_between = True
        started = time.perf_counter()
        try:
            self._serve_interactive()
        finally:
            self._serving_between = False
            self._between_s += time.perf_counter() - started

    def call_size(self, modality: str) -> int:
        """Inputs per bulk model call: the size this machine runs fastest, as measured.

        Sizes are powers of two. The size doubles while the doubled one is unmeasured or at
        least `_GAIN` cheaper per input; the chosen size is the smallest within `_GAIN` of the
        cheapest measured. On a modality that cannot pause mid-call, a call is also kept
        within max_call_s where a measured size allows, so a query waits for little.
        max_call_s 0 runs bulk batches whole.
        """
        if self.max_call_s <= 0:
            return self.max_batch  # --max-model-call-ms 0: whole batches, as asked
        measured = {size: cost for (m, size), cost in self._cost.items() if m == modality}
        if not measured:
            seen = [size for (m, size) in self._sizes_seen if m == modality]
            return min(max(seen, default=FIRST_CALL), self.max_batch)  # measure it first
        bound = modality not in self.pausable
        fastest = _fastest(measured)
        if bound:
            quick = [size for size, cost in measured.items() if size * cost <= self.max_call_s]
            fastest = min(fastest, max(quick)) if quick else min(measured)
        doubled = fastest * 2
        if doubled <= self.max_batch and doubled not in measured and fastest == max(measured) \
                and not (bound and doubled * measured[fastest] > self.max_call_s):
            return doubled  # bigger may be faster still: try it
        return fastest

    def tuning(self) -> list[TowerTuning]:
        """What was measured per modality and chosen from it (GetServerInfo reports it).

        The size reported is the one measured fastest so far; while a bigger one is still
        being tried, the reason says so.
        """
        out = []
        for modality in sorted({m for m, _ in self._cost}):
            costs = dict(sorted((s, c) for (m, s), c in self._cost.items() if m == modality))
            size = self.call_size(modality)
            chosen = size if size in costs else _fastest(costs)
            tried = ", ".join(f"{s}: {c * 1000:.1f}" for s, c in costs.items())
            why = ("whole batches (--max-model-call-ms 0)" if self.max_call_s <= 0
                   else "queries served between the call's blocks" if modality in self.pausable
                   else f"calls kept within {self.max_call_s * 1000:.0f} ms for queries")
            trying = "" if size in costs else f"; trying {size} next"
            out.append(TowerTuning(modality, chosen, 1 / max(costs[chosen], 1e-9),
                                   f"ms per input by batch size {{{tried}}}; {why}{trying}"))
        return out

    def _encode_in_calls(self, modality: str, inputs: list[str] | torch.Tensor) -> np.ndarray:
        """A bulk batch as calls of the chosen size, serving interactive work between them."""
        parts = []
        start = 0
        pause = modality in self.pausable
        while start < len(inputs):
            if start > 0:
                self._serve_interactive()
            size = _power_of_two_at_most(min(self.call_size(modality), len(inputs) - start))
            parts.append(self._encode(modality, inputs[start:start + size], pause))
            start += size
        self._announce(modality)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _announce(self, modality: str) -> None:
        """Log the bulk call size when the measurements settle on a new one."""
        size = self.call_size(modality)
        if (modality, size) in self._cost and self._announced.get(modality) != size:
            self._announced[modality] = size
            tuning = next(t for t in self.tuning() if t.tower == modality)
            log.info("%s tower: bulk calls of %d inputs, %.1f inputs/s (%s)", modality, size,
                     tuning.inputs_per_second, tuning.reason)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queued())


def _fastest(costs: dict[int, float]) -> int:
    """The smallest batch size whose cost per input is within _GAIN of the cheapest."""
    best = min(costs.values())
    return min(size for size, cost in costs.items() if cost <= best * (1 + _GAIN))


def _power_of_two_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


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
