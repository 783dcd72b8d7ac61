"""Which floating-point precision the model runs in, chosen from what the hardware does natively.

`auto` (the default) picks the fastest precision whose embeddings stay within the tested
tolerance of fp32 (cosine >= 0.999 per vector, tests/unit/test_precision.py):

* CUDA: bf16 where the GPU supports it (Ampere and later), else fp16.
* CPU: bf16 where the CPU has native bf16 matrix instructions, read from the CPU's own feature
  flags (x86: avx512_bf16 or amx_bf16; Arm: bf16), never guessed from the vendor; else fp32.
  Without them torch emulates bf16, which is slower than fp32.

`fp32` stays available for exact parity with open_clip.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

CHOICES = ("auto", "fp32", "fp16", "bf16")
# CPU feature flags that mean bf16 matrix arithmetic in hardware.
X86_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
ARM_BF16_FLAGS = ("bf16",)
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first CPU in a /proc/cpuinfo text (x86 `flags`, Arm `Features`)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def native_cpu_bf16(cpuinfo: str | None = None, machine: str | None = None) -> str | None:
    """The flag that shows this CPU computes bf16 natively, or None.

    `cpuinfo` and `machine` default to this machine's /proc/cpuinfo and architecture; tests
    pass others in. macOS on Apple silicon answers through sysctl (FEAT_BF16, M2 and later).
    """
    machine = (machine or platform.machine()).lower()
    if cpuinfo is None:
        if sys.platform == "darwin":
            return _darwin_bf16()
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            return None
    flags = cpu_flags(cpuinfo)
    wanted = ARM_BF16_FLAGS if machine in ("aarch64", "arm64") else X86_BF16_FLAGS
    return next((flag for flag in wanted if flag in flags), None)


def _darwin_bf16() -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True,
                             text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return "FEAT_BF16" if out == "1" else None


def choose_precision(requested: str, device: torch.device,
                     detect_cpu_bf16: Callable[[], str | None] = native_cpu_bf16
                     ) -> tuple[str, str]:
    """(precision, reason): what the model runs in and why, for the log and GetServerInfo."""
    if requested != "auto":
        return requested, f"--precision {requested} was asked for"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16"
        return "fp16", f"auto: {torch.cuda.get_device_name(device)} has no bf16; fp16"
    if device.type != "cpu":
        return "fp32", f"auto: fp32 on {device.type}"
    flag = detect_cpu_bf16()
    if flag:
        return "bf16", f"auto: the CPU computes bf16 natively ({flag}), about 2x fp32"
    return "fp32", ("auto: the CPU has no native bf16 matrix instructions "
                    f"({', '.join(X86_BF16_FLAGS + ARM_BF16_FLAGS)}); fp32")
