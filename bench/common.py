"""Helpers shared by the benchmarks: timing summaries, aligned tables, the machine's description."""

from __future__ import annotations

import os
import platform
import sqlite3
import sys
import time
from collections.abc import Sequence
from importlib import metadata

import numpy as np

_STARTED = time.perf_counter()


def progress(message: str) -> None:
    """A progress line on stderr, so stdout holds only the results."""
    print(f"[{time.perf_counter() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def ms(seconds: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(median, p99) of latencies given in seconds, in milliseconds."""
    values = np.asarray(seconds, dtype=np.float64) * 1e3
    return float(np.median(values)), float(np.percentile(values, 99))


def fmt(value: object) -> str:
    """A table cell: floats to three significant digits (integers kept whole)."""
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) >= 1 or value == 0 else f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table with aligned columns (text left, numbers right)."""
    cells = [[fmt(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w)
                 for v, w, num in zip(values, widths, numeric, strict=True)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric, strict=True)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def section(title: str, body: str) -> None:
    """Print a titled block of results to stdout."""
    print(f"\n### {title}\n\n{body}", flush=True)


def machine() -> str:
    """One line naming the CPU, cores, memory and the versions that matter for the numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal")))
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    versions = []
    for package in ("numpy", "hnswlib"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} ?")
    return (f"{cpu}, {os.cpu_count()} cores{memory}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, {', '.join(versions)}, "
            f"SQLite {sqlite3.sqlite_version}")


def load() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews timings."""
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"
