"""A full data dir: writes get RESOURCE_EXHAUSTED, reads go on, space coming back heals it."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from clipsearch import Client, ClipSearchError
from conftest import ServerProcess

DIM = 64


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


def test_full_data_dir(tiny_checkpoint: Path, small_disk: Path) -> None:
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(300, DIM)).astype(np.float32)
    server = ServerProcess(tiny_checkpoint, small_disk, "--snapshot-interval-s", "0.2").start()
    try:
        with Client(server.address) as c:
            c.upsert("photos", ids=[f"a{i}" for i in range(20)], vectors=vectors[:20])
            time.sleep(0.5)  # a snapshot lands
            filler = _fill(small_disk)
            with pytest.raises(ClipSearchError) as err:
                for round_ in range(20):  # until the store's spare pages are used up
                    c.upsert("photos", ids=[f"b{round_}-{i}" for i in range(300)],
                             vectors=vectors, metadata=[{"pad": "x" * 2000}] * 300)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
            assert "full" in err.value.details
            with pytest.raises(ClipSearchError) as err:
                c.create_collection("another")
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
            # reads go on, and the refused batch left nothing behind
            written = c.count("photos")
            assert written % 300 == 20
            assert c.search("photos", vector=vectors[0], k=1)[0].id == "a0"
            time.sleep(0.6)  # snapshots fail meanwhile
            folder = small_disk / "collections" / "photos"
            assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
            assert not (small_disk / "collections" / "another").exists()
            # space comes back: writes go on without a restart
            filler.unlink()
            c.upsert("photos", ids=["after"], vectors=vectors[:1])
            assert c.count("photos") == written + 1
            c.create_collection("another")
    finally:
        assert server.stop() == 0, server.log()
    assert "INTERNAL" not in server.log()
    again = ServerProcess(tiny_checkpoint, small_disk).start()
    try:
        with Client(again.address) as c:
            assert c.count("photos") == written + 1
    finally:
        assert again.stop() == 0, again.log()


def test_a_snapshot_on_a_full_disk_leaves_no_temporary_files(small_disk: Path) -> None:
    from clipsearch_server.stores.local.hnsw import HnswIndex

    folder = small_disk / "graph"
    index = HnswIndex(folder, DIM, 16, 100)
    vectors = np.random.default_rng(1).normal(size=(2000, DIM)).astype(np.float32)
    index.add(np.arange(2000, dtype=np.int64), vectors / np.linalg.norm(vectors, axis=1,
                                                                             keepdims=True))
    index.seq = 1
    filler = _fill(small_disk)
    with pytest.raises(OSError):
        index.save()
    assert [p.name for p in folder.iterdir()] == []  # no partial or temporary file
    filler.unlink()
    assert index.save().seq == 1


def test_a_read_only_store_maps_to_unavailable(tmp_path: Path) -> None:
    import sqlite3

    from clipsearch_server.errors import Unavailable, storage_error

    path = tmp_path / "ro.sqlite3"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    with pytest.raises(sqlite3.Error) as err:
        db.execute("INSERT INTO t VALUES (1)")
    db.close()
    mapped = storage_error(err.value)
    assert isinstance(mapped, Unavailable) and "cannot be written" in str(mapped)
    assert storage_error(ValueError("a bug")) is None
