"""Bulk work yields the CPU to queries; snapshots take only idle CPU and disk; huge pages.

The latencies these buy are measured in bench/bench_interactive.py and bench/bench_snapshot.py;
here each mechanism is checked to be in effect where the OS offers it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from clipsearch_server.launch import huge_pages_available
from clipsearch_server.priority import BULK_NICE, background_pool
from clipsearch_server.stores.local import snapshot_child

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="per-thread nice values and SCHED_IDLE are Linux's")


def this_thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@linux_only
def test_bulk_pool_threads_run_below_the_caller() -> None:
    mine = this_thread_nice()
    with background_pool(2, "test-bulk") as pool:
        theirs = set(pool.map(lambda _: this_thread_nice(), range(8)))
    assert theirs == {min(19, mine + BULK_NICE)}
    assert this_thread_nice() == mine  # the caller's own priority is untouched


@linux_only
def test_the_snapshot_child_takes_only_idle_time() -> None:
    pid = os.fork()
    if pid == 0:
        snapshot_child.idle_priority()
        os._exit(0 if os.sched_getscheduler(0) == os.SCHED_IDLE else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_old_snapshot_files_are_removed_in_steps(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(snapshot_child, "WRITE_BACK_BYTES", 1000)
    big = tmp_path / "index-1.hnsw"
    big.write_bytes(os.urandom(10_500))
    sizes: list[int] = []
    real_truncate = os.ftruncate
    monkeypatch.setattr(os, "ftruncate", lambda fd, n: sizes.append(n) or real_truncate(fd, n))
    snapshot_child.remove_gradually(big)
    snapshot_child.remove_gradually(big)  # already gone: nothing to do
    assert not big.exists()
    assert sizes == list(range(9_500, 0, -1000))


HUGE_PAGE_PROBE = """
import os, numpy as np, hnswlib
from clipsearch_server.launch import with_huge_pages
with_huge_pages()
graph = hnswlib.Index(space="ip", dim=512)
graph.init_index(max_elements=20_000, M=16, ef_construction=10)
graph.add_items(np.ones((20_000, 512), dtype=np.float32) / 512 ** 0.5)
rollup = open("/proc/self/smaps_rollup").read()
huge = next(int(l.split()[1]) for l in rollup.splitlines() if l.startswith("AnonHugePages"))
print(os.environ.get("GLIBC_TUNABLES"), huge)
"""


def probe(env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", HUGE_PAGE_PROBE], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    tunables, huge_kib = out.split()
    return tunables, int(huge_kib)


@pytest.mark.skipif(not huge_pages_available(),
                    reason="needs glibc 2.35+ and transparent huge pages")
def test_the_server_process_puts_the_graph_on_huge_pages() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    tunables, huge_kib = probe({**env, "CLIPSEARCH_HUGE_PAGES": ""})
    assert "glibc.malloc.hugetlb=1" in tunables
    assert huge_kib >= 20_000  # most of the graph's ~41 MB
    # opting out keeps the process as started
    tunables, _ = probe({**env, "CLIPSEARCH_HUGE_PAGES": "0"})
    assert tunables == "None"
