"""A bound on decoded pixels held at once across all requests.

Each request already decodes in windows of one model batch, a few ahead; but many large
requests at once would still each hold their windows. A window takes its share of this budget
before it decodes and gives it back once the model has run on it. A window that cannot get its
share waits (the windows ahead of it free theirs as the model runs), for at most `wait_s` or the
call's deadline; then the call is refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from ...errors import ResourceExhausted

# How long a window may wait for decode budget before its call is refused.
DEFAULT_WAIT_S = 10.0


class DecodeBudget:
    """Bytes of decoded image tensors in flight, across every request, at most `limit`."""

    def __init__(self, limit: int, wait_s: float = DEFAULT_WAIT_S) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self.used = 0
        self.peak = 0  # highest `used` seen, for tests and metrics
        self._freed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int, deadline: float | None = None) -> AsyncIterator[None]:
        """Hold `nbytes` of the budget for the block (one window alone may use all of it)."""
        nbytes = min(nbytes, self.limit)
        timeout = self.wait_s
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        async with self._freed:
            try:
                await asyncio.wait_for(
                    self._freed.wait_for(lambda: self.used + nbytes <= self.limit), timeout)
            except TimeoutError:
                raise ResourceExhausted(
                    f"the server is decoding too many images at once ({self.used} of "
                    f"{self.limit} bytes of decoded pixels in use); retry later") from None
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            async with self._freed:
                self.used -= nbytes
                self._freed.notify_all()
