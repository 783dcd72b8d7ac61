"""Ownership of the data dir: one server process per folder, and enough file descriptors.

Two servers writing one data dir would each keep their own graph and disagree after the first
write, so a server holds an exclusive OS file lock (flock) on `<data_dir>/.lock` for its whole
life. The kernel releases it when the process dies, even by SIGKILL, so no stale lock is left.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# Descriptors an open collection keeps: the SQLite store, its WAL and shared-memory files,
# plus headroom for a snapshot being written.
FDS_PER_COLLECTION = 4
# Descriptors the rest of the server needs: sockets, model files, threads' pipes, logs.
FDS_RESERVED = 256


class DataDirLocked(RuntimeError):
    """Another process holds the data dir."""


class DataDirLock:
    """An exclusive lock on a data dir, held until release() or the process ends."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirLocked(
                f"data dir {data_dir.resolve()} is in use by another server (pid {holder}); "
                "stop it first, or give this one another --data-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns how many collections it allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
    return max(0, (soft - FDS_RESERVED) // FDS_PER_COLLECTION)


def check_fd_limit(data_dir: Path, allowed: int) -> str | None:
    """A sentence when the data dir holds more collections than the descriptor limit allows."""
    root = data_dir / "collections"
    present = sum(1 for p in root.iterdir() if p.is_dir()) if root.is_dir() else 0
    if present > allowed:
        return (f"{present} collections in {root} but the open-file limit (ulimit -n) allows "
                f"about {allowed}; raise it to at least "
                f"{present * FDS_PER_COLLECTION + FDS_RESERVED}")
    return None
