"""Process start-up: back large allocations with huge pages, then run the app.

A snapshot forks the server (stores/local/snapshot_child.py), and fork copies the page tables
of every mapped page: with hnswlib's graph on 4 KiB pages that is 10-25 ms of stall at 200k
items, during which no thread runs. glibc puts its large allocations on transparent huge
pages when the tunable `glibc.malloc.hugetlb=1` is set, which cuts the fork to 1-2 ms
(bench/bench_snapshot.py).
The tunable is read only when a process starts, so the entry points set it and re-execute the
same command once. Set CLIPSEARCH_HUGE_PAGES=0 to keep the process as started.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """glibc 2.35 or later (it has the tunable) and a kernel that hands out huge pages."""
    if not sys.platform.startswith("linux") or not hasattr(os, "confstr"):
        return False
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        if name != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
            return False
        return "[never]" not in THP_MODE.read_text()
    except (OSError, ValueError, AttributeError):
        return False


def with_huge_pages(command_tail: list[str] | None = None) -> None:
    """Re-execute this command once with the huge-page tunable set (or return at once).

    `command_tail` is how the caller's own arguments end the command line (`serve ARGS` for
    the CLI): when the process's command line does not end so (a caller inside a test, say),
    nothing is re-executed.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if command_tail is not None and sys.argv[-len(command_tail):] != command_tail:
        return
    if ("glibc.malloc.hugetlb" in tunables or os.environ.get("CLIPSEARCH_HUGE_PAGES") == "0"
            or not huge_pages_available()):
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, sys.orig_argv)
    except OSError:  # could not re-execute: run as started, forks are only slower
        return


def check_settings(argv: list[str]) -> None:
    """Refuse bad flags (a missing --checkpoint, say) within a second: exits 2 with the reason.

    Importing the app takes 5-20 s (torch, open_clip), so the flags are checked before it,
    and before the re-execution; the app parses them again, in milliseconds.
    """
    from .config import parse_settings

    parse_settings(argv)


def main() -> int:
    """Entry point of `clipsearch-server` and `python -m clipsearch_server`."""
    check_settings(sys.argv[1:])
    with_huge_pages()
    from .app import main as app_main

    return app_main()
