"""Helpers shared by the benchmarks: timing summaries, aligned tables, the machine's description."""

from __future__ import annotations

import itertools
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

_STARTED = time.perf_counter()

# torch's kernels as on an AVX2-only CPU (AMD Zen 3): oneDNN (convolutions, bf16 matmuls), MKL
# (fp32 matmuls) and ATen's own vectorised kernels. ONNX Runtime, Pillow and hnswlib have no
# such switch and keep using what the CPU has.
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "ATEN_CPU_CAPABILITY": "avx2"}


def limit_isa_before_torch() -> None:
    """With `--isa avx2` on the command line, start again with AVX2_ENV set, before torch loads
    (the libraries read it once); servers started from here inherit it."""
    args = " ".join(sys.argv[1:]).replace("=", " ").split()
    if not any(a == "--isa" and b == "avx2" for a, b in itertools.pairwise(args)):
        return
    if all(os.environ.get(k) == v for k, v in AVX2_ENV.items()):
        return
    os.environ.update(AVX2_ENV)
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


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
    flags = cpu_flags()
    versions = []
    for package in ("numpy", "hnswlib"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} ?")
    return (f"{cpu} ({flags}), {os.cpu_count()} cores{memory}; "
            f"{platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, {', '.join(versions)}, "
            f"SQLite {sqlite3.sqlite_version}")


# The instruction sets that change which kernels (and precisions) run fast.
_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "asimd", "bf16")


def cpu_flags() -> str:
    """The CPU's flags among those that matter for the numbers, e.g. 'avx2 fma avx512f'."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next(ln for ln in f if ln.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return "flags unknown"
    present = set(line.split(":", 1)[1].split())
    return " ".join(f for f in _FLAGS if f in present) or "none of " + " ".join(_FLAGS)


def run_for(threads: Sequence[threading.Thread], stop: threading.Event, seconds: float,
            errors: Sequence[BaseException]) -> float:
    """Let started worker threads run for `seconds`, stop and join them; the seconds they ran.
    The first error a worker recorded is raised."""
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - began
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return elapsed


def load() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews timings."""
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def start_server(model: str, data_dir: Path, extra: Sequence[str] = (), device: str = "cpu",
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m clipsearch_server` with random weights on a free port, once it is SERVING.

    Its log is `server-PORT.log` beside `data_dir`. The HTTP port is off, so that several
    servers can run at once.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = data_dir.parent / f"server-{port}.log"
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "clipsearch_server", "--port", str(port), "--model", model,
             "--random-weights", "--data-dir", str(data_dir), "--device", device,
             "--http-port", "0", *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(3000):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited; see {log_path}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc, address
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"server did not become ready; see {log_path}")
