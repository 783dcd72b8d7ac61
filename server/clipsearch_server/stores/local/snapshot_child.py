"""The forked child that writes a graph snapshot, and the OS plumbing around it (Linux).

hnswlib's save_index holds the GIL for its whole run (0.5 s at 100k items, measured in
bench/bench_snapshot.py), which would stop every thread of the server. So `start` forks a
child that writes the file from a copy-on-write image of the graph: it dies with the server
(PR_SET_PDEATHSIG), takes only idle CPU and disk time (SCHED_IDLE or nice 19, the idle I/O
class), writes the file back a few MiB at a time, then hashes and fsyncs it and reports its
size and SHA-256 on a pipe, which `wait` reads. The fork is fast where the server's large
allocations sit on huge pages (launch.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import signal
import warnings
from pathlib import Path

import hnswlib

PR_SET_PDEATHSIG = 1  # prctl option, linux/prctl.h
# ioprio_set(2): the idle I/O class (honoured by the bfq and mq-deadline schedulers)
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}  # syscall numbers; glibc has no wrapper
IOPRIO_WHO_PROCESS, IOPRIO_CLASS_IDLE, IOPRIO_CLASS_SHIFT = 1, 3, 13
# sync_file_range(2): wait for earlier writes, start this range's, wait for them
SYNC_RANGE_ALL = 1 | 2 | 4
WRITE_BACK_BYTES = 4 << 20


# Only the forking thread runs in the child, and it only writes the graph file, then exits.
warnings.filterwarnings("ignore", message=r".*multi-threaded, use of fork\(\) may lead",
                        category=DeprecationWarning)


class ChildSaveFailed(OSError):
    """The forked child did not write the snapshot; the caller may save in-process instead."""


def start(graph: hnswlib.Index, path: Path) -> tuple[int, int]:
    """Fork a child that writes, hashes and fsyncs `graph` at `path`: (its pid, report pipe)."""
    parent = os.getpid()
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except BaseException:
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:  # the child: write, then leave without running any of the parent's cleanup
        code = 1
        try:
            os.close(read_end)
            _die_with(parent)
            idle_priority()
            graph.save_index(str(path))
            _write_back_gradually(path)
            size, digest = fsync_and_hash(path)
            os.write(write_end, f"{size} {digest}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, read_end


def wait(pid: int, report: int, name: str) -> tuple[int, str]:
    """Wait for the child `start` forked; the file's size and SHA-256 as it reported them."""
    with os.fdopen(report, "rb") as pipe:
        said = pipe.read().decode()  # releases the GIL while it waits
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not said:
        raise ChildSaveFailed(f"the child writing snapshot {name} failed (exit status {code})")
    size, digest = said.split()
    return int(size), digest


def _write_back_gradually(path: Path) -> None:
    """Linux: put the file on disk a few MiB at a time before the final fsync.

    On ext4 (data=ordered) an fsync commits the journal, and a commit waits for every block
    allocated in it to be written, so one fsync of a large new file holds up every other
    fsync, such as the store's for each acknowledged write, until all of it is on disk. Written
    back in small ranges, only the range in flight can hold them up.
    """
    sync_file_range = getattr(_libc(), "sync_file_range", None)
    if sync_file_range is None:
        return
    sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for offset in range(0, size, WRITE_BACK_BYTES):
            if sync_file_range(fd, offset, WRITE_BACK_BYTES, SYNC_RANGE_ALL) != 0:
                return  # not supported here: the fsync that follows does it all
    finally:
        os.close(fd)


def remove_gradually(path: Path) -> None:
    """Delete a large file a few MiB at a time.

    Freeing a whole graph file's blocks in one unlink is one long journal transaction on ext4,
    and every fsync in the meantime (the store's, for each acknowledged write) waits for it.
    """
    with contextlib.suppress(FileNotFoundError):
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            while size > WRITE_BACK_BYTES:
                size -= WRITE_BACK_BYTES
                os.ftruncate(f.fileno(), size)
        path.unlink()


def _libc() -> ctypes.CDLL:
    """The C library, for the Linux calls Python's os module lacks (the snapshot child's)."""
    return ctypes.CDLL(None, use_errno=True)


def idle_priority() -> None:
    """Linux: take CPU and disk time only when nothing else wants them (the snapshot child)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError, AttributeError):
            os.nice(19)  # where SCHED_IDLE is refused or missing
    number = _IOPRIO_SET.get(os.uname().machine)
    if number is not None:
        with contextlib.suppress(OSError, AttributeError):
            _libc().syscall(number, IOPRIO_WHO_PROCESS, 0,
                            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT)


def _die_with(parent: int) -> None:
    """Linux: be killed when the parent dies (a killed server leaves no writer behind)."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def file_hash(path: Path) -> tuple[int, str]:
    """(size, SHA-256) of a file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def fsync_and_hash(path: Path) -> tuple[int, str]:
    result = file_hash(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return result
