"""Heavy calls get a pool and budgets of their own, and stop when nobody waits for them.

FindDuplicates, Cluster, Recommend and Classify read whole stored sets and can run for
minutes. An attack pass found seven abandoned FindDuplicates calls (neighbors 100, ef 4096 on
5,000 vectors) going on in the default thread pool, the one Search used too: for about five
minutes every Search answered DEADLINE_EXCEEDED while health said SERVING. So:

* their blocking work runs in a pool of its own, at the lowest CPU priority (priority.py), on
  at most all cores but one, and never in the pool that Search, upserts and health use;
* at most `--max-heavy-calls` run at once, and at most `--max-heavy-calls-per-caller` for one
  token (or one client address without authentication); others are refused at once with
  RESOURCE_EXHAUSTED rather than queued behind work that may take minutes;
* the work calls a StopCheck between steps (a chunk of neighbour queries, a few k-means
  iterations): once the client has cancelled, gone away or passed its deadline, the next check
  raises and the thread is free. A cancelled call keeps its slot until its thread has stopped,
  so a new call never queues behind an abandoned one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from .errors import ClipSearchError, DeadlineExceeded, ResourceExhausted
from .priority import background_pool

T = TypeVar("T")
STOP_WAIT_S = 10.0  # the longest a cancelled call waits for its thread to notice


class Cancelled(ClipSearchError):
    code_name = "CANCELLED"


class StopCheck:
    """Called by heavy work between its steps: raises once the work should stop."""

    def __init__(self, deadline: float | None) -> None:
        self._stopped = threading.Event()
        self._deadline = deadline

    def stop(self) -> None:
        self._stopped.set()

    def __call__(self) -> None:
        if self._stopped.is_set():
            raise Cancelled("the call was cancelled")
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise DeadlineExceeded("the call's deadline passed while it ran")


class HeavyCall:
    """One admitted heavy call: runs its blocking steps in the heavy pool."""

    def __init__(self, pool: Any, check: StopCheck) -> None:
        self._pool = pool
        self.check = check

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the heavy pool; if this call is cancelled meanwhile, the work is told
        to stop and this waits (briefly) for its thread before letting the cancel through."""
        self.check()
        future = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self.check.stop()
            await asyncio.wait((future,), timeout=STOP_WAIT_S)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: the cancel is what matters now
            raise


class HeavyWork:
    """The heavy pool and its budgets: one for the server, one per caller."""

    def __init__(self, max_calls: int, max_per_caller: int) -> None:
        self.max_calls = max_calls
        self.max_per_caller = max_per_caller
        # One core is left to queries: admitted calls beyond the pool's threads wait their turn
        # in it (and a cancelled one that has not started is simply dropped).
        self._pool = background_pool(min(max_calls, max(1, (os.cpu_count() or 1) - 1)),
                                     "clipsearch-heavy")
        self.running = 0
        self._per_caller: collections.Counter[str] = collections.Counter()

    @contextlib.asynccontextmanager
    async def call(self, context: grpc.aio.ServicerContext, deadline: float | None
                   ) -> AsyncIterator[HeavyCall]:
        """Admit one heavy call (RESOURCE_EXHAUSTED beyond a budget) for the block's length."""
        caller = caller_of(context)
        if self.running >= self.max_calls:
            raise ResourceExhausted(
                f"{self.running} heavy calls (FindDuplicates, Cluster, Recommend, Classify) "
                f"are running, the server's limit (--max-heavy-calls {self.max_calls}); "
                "retry later")
        if self._per_caller[caller] >= self.max_per_caller:
            raise ResourceExhausted(
                f"this caller already runs {self._per_caller[caller]} heavy calls, its limit "
                f"(--max-heavy-calls-per-caller {self.max_per_caller}); retry when one ends")
        self.running += 1
        self._per_caller[caller] += 1
        try:
            yield HeavyCall(self._pool, StopCheck(deadline))
        finally:
            self.running -= 1
            self._per_caller[caller] -= 1
            if not self._per_caller[caller]:
                del self._per_caller[caller]


def caller_of(context: grpc.aio.ServicerContext) -> str:
    """Who a budget counts a call against: its token (hashed), or its client address."""
    token = dict(context.invocation_metadata() or ()).get("authorization")
    if token:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    peer = context.peer() or ""
    host = peer.rsplit(":", 1)[0] if peer.count(":") else peer
    return "peer:" + host.removeprefix("ipv4:").removeprefix("ipv6:")
