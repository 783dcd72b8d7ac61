"""Ownership of the data dir (one server process per folder) and the file-descriptor limit.

Two servers writing one data dir would each keep their own graph and disagree after the first
write, so a server holds an exclusive OS file lock (flock) on `<data_dir>/server.lock` for its
whole life. The kernel drops it when the process dies, even by SIGKILL: no stale lock is left.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "server.lock"
# Descriptors an open collection keeps: the SQLite store, its WAL and shared-memory files.
FDS_PER_COLLECTION = 3
# Descriptors the rest of the server needs: sockets, model files, pipes, logs, snapshots.
FDS_RESERVED = 256


class DataDirBusy(RuntimeError):
    """Another live process holds the data dir."""


class DataDirLock:
    """An exclusive lock on a data dir, held from acquire() until release() or process end."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise DataDirBusy naming the dir and the holder's pid."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirBusy(
                f"data dir {self.data_dir.resolve()} is in use by another server (pid "
                f"{holder}); stop that one first or give this one another --data-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def raise_descriptor_limit(connections: int = 0) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (and logs) how many
    collections the limit allows once `connections` (the doors' connection limits) are set
    aside."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = (1 << 20) if hard == resource.RLIM_INFINITY else hard
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit above %d: %s", soft, exc)
    allowed = max(0, (soft - FDS_RESERVED - connections) // FDS_PER_COLLECTION)
    log.info("open-file limit %d: room for about %d collections", soft, allowed)
    return allowed
