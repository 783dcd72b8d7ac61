"""Bulk work yields the CPU to queries: thread pools whose threads run at a lower priority.

On a CPU server the model's threads, the image decoders and the thumbnail makers share a few
cores. Decoders that compete with the model at equal priority preempt its threads in the
middle of parallel sections, so every model call, a query's too, runs slower (measured in
bench/bench_interactive.py). Bulk image work therefore runs in threads with a higher nice
value: it gets whatever the model and the request handlers leave, and no less when they are
idle. Linux sets the nice value per thread; elsewhere this is a no-op. Raising one's own nice
value needs no privilege.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

BULK_NICE = 19  # the lowest: eight such threads together get about a tenth of a core


def lower_this_thread(nice: int = BULK_NICE) -> None:
    """Raise the calling thread's nice value by `nice` (Linux; elsewhere nothing happens)."""
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    with contextlib.suppress(OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)


def background_pool(workers: int, name: str, nice: int = BULK_NICE) -> ThreadPoolExecutor:
    """A thread pool for bulk work whose threads run `nice` steps below the caller."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=lower_this_thread,
                              initargs=(nice,))
