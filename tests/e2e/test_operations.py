"""Operations: unreadable stores are kept and reported, one server per data dir, names."""

from __future__ import annotations

import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from clipsearch import Client, ClipSearchError
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc
from clipsearch_server.errors import InvalidArgument
from clipsearch_server.stores.base import check_name
from clipsearch_server.stores.local import STORE_FILE
from clipsearch_server.stores.local.sqlite import Store
from conftest import TINY_MODEL, ServerProcess

DIM = 64


def _write(address: str, name: str, n: int) -> None:
    rng = np.random.default_rng(7)
    with Client(address) as c:
        c.upsert(name, ids=[f"{name}-{i}" for i in range(n)],
                 vectors=rng.normal(size=(n, DIM)).astype(np.float32))


def _unavailable(address: str) -> dict[str, str]:
    with grpc.insecure_channel(address) as channel:
        info = pb_grpc.ClipSearchServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest())
    return {u.name: u.reason for u in info.unavailable_collections}


@pytest.fixture()
def two_collections(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    server = ServerProcess(tiny_checkpoint, data).start()
    _write(server.address, "good", 5)
    _write(server.address, "bad", 7)
    assert server.stop() == 0, server.log()
    return data


def test_damaged_store_is_kept_reported_and_served_again_once_repaired(
        tiny_checkpoint: Path, two_collections: Path) -> None:
    store = two_collections / "collections" / "bad" / STORE_FILE
    original = store.read_bytes()
    store.write_bytes(b"\xff" * 16 + original[16:])
    server = ServerProcess(tiny_checkpoint, two_collections).start()
    try:
        assert store.exists() and store.read_bytes()[16:] == original[16:]
        assert "bad" in _unavailable(server.address)
        with Client(server.address) as c:
            assert "DatabaseError" in c.info().unavailable_collections["bad"]
            assert [info.name for info in c.collections()] == ["good"]
            assert c.count("good") == 5
            for call in (lambda: c.count("bad"), lambda: c.drop_collection("bad"),
                         lambda: c.upsert("bad", ids=["x"], vectors=np.ones((1, DIM)))):
                with pytest.raises(ClipSearchError) as err:
                    call()
                assert err.value.code == grpc.StatusCode.UNAVAILABLE
                assert "bad" in err.value.details
        assert "collection bad is unavailable" in server.log()
    finally:
        assert server.stop() == 0, server.log()
    assert store.exists()
    store.write_bytes(original)
    server = ServerProcess(tiny_checkpoint, two_collections).start()
    try:
        assert _unavailable(server.address) == {}
        with Client(server.address) as c:
            assert c.count("bad") == 7
    finally:
        assert server.stop() == 0, server.log()


def test_store_locked_by_another_process_at_start_is_not_removed(
        tiny_checkpoint: Path, two_collections: Path) -> None:
    store = two_collections / "collections" / "bad" / STORE_FILE
    holder = sqlite3.connect(store, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        server = ServerProcess(tiny_checkpoint, two_collections).start()
        try:
            assert "locked" in _unavailable(server.address)["bad"]
            with Client(server.address) as c:
                assert c.count("good") == 5
        finally:
            assert server.stop() == 0, server.log()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.exists()
    server = ServerProcess(tiny_checkpoint, two_collections).start()
    try:
        with Client(server.address) as c:
            assert c.count("bad") == 7
    finally:
        assert server.stop() == 0, server.log()


def test_only_a_store_without_committed_settings_counts_as_never_created(tmp_path: Path) -> None:
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    assert Store.peek_meta(empty) == {}
    no_settings = tmp_path / "no-settings.sqlite3"
    Store(no_settings).close()
    assert Store.peek_meta(no_settings) == {}
    damaged = tmp_path / "damaged.sqlite3"
    store = Store(damaged)
    store.write_meta({"dim": "4"})
    store.close()
    assert Store.peek_meta(damaged) == {"dim": "4"}
    damaged.write_bytes(b"\0" * 16 + damaged.read_bytes()[16:])
    with pytest.raises(sqlite3.DatabaseError):
        Store.peek_meta(damaged)


def test_a_half_created_collection_is_still_removed(tiny_checkpoint: Path,
                                                    tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "collections" / "never").mkdir(parents=True)
    Store(data / "collections" / "never" / STORE_FILE).close()  # killed before its settings
    server = ServerProcess(tiny_checkpoint, data).start()
    try:
        assert not (data / "collections" / "never").exists()
        assert _unavailable(server.address) == {}
    finally:
        assert server.stop() == 0, server.log()


def _second_server(tiny_checkpoint: Path, data: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clipsearch_server", "--port", "0", "--model", TINY_MODEL,
         "--checkpoint", str(tiny_checkpoint), "--data-dir", str(data), "--device", "cpu"],
        capture_output=True, text=True, timeout=60)


def test_second_server_on_the_same_data_dir_exits_at_once(tiny_checkpoint: Path,
                                                          tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = ServerProcess(tiny_checkpoint, data).start()
    assert first.proc is not None
    started = time.monotonic()
    second = _second_server(tiny_checkpoint, data)
    assert second.returncode == 2
    assert time.monotonic() - started < 30
    assert str(data.resolve()) in second.stderr
    assert f"pid {first.proc.pid}" in second.stderr
    assert "loading model" not in second.stderr  # refused before anything else
    # kill -9 leaves no stale lock: the OS drops it with the process
    first.stop(signal.SIGKILL)
    again = ServerProcess(tiny_checkpoint, data).start()
    assert again.stop() == 0, again.log()


@pytest.mark.parametrize("name", [f"abc{chr(c)}" for c in [*range(32), 127]]
                         + [f"{chr(c)}abc" for c in [*range(32), 127]] + ["abc\n"])
def test_names_with_control_characters_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        check_name(name)


def test_trailing_newline_name_is_refused_by_the_server(client: Client) -> None:
    with pytest.raises(ClipSearchError) as err:
        client.create_collection("abc\n")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_too_few_descriptors_leave_collections_on_disk(
        tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    server = ServerProcess(tiny_checkpoint, data).start()
    for i in range(40):
        _write(server.address, f"c{i:02d}", 2)
    assert server.stop() == 0, server.log()

    popen = subprocess.Popen

    def limited_popen(*args: object, **kwargs: object) -> subprocess.Popen:
        def limit() -> None:  # in the child only: 100 descriptors, soft and hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))
        return popen(*args, preexec_fn=limit, **kwargs)  # type: ignore[call-overload]

    limited = ServerProcess(tiny_checkpoint, data)
    monkeypatch.setattr(subprocess, "Popen", limited_popen)
    try:
        limited.start()
    except RuntimeError:
        pass  # it may not get as far as serving; what matters is what it left on disk
    finally:
        monkeypatch.setattr(subprocess, "Popen", popen)
    try:
        if limited.proc is not None and limited.proc.poll() is None:
            unavailable = _unavailable(limited.address)
            with Client(limited.address) as c:
                served = [info.name for info in c.collections()]
            assert len(served) + len(unavailable) == 40
            assert unavailable, "100 descriptors cannot hold 40 collections"
    finally:
        if limited.proc is not None and limited.proc.poll() is None:
            limited.stop()
    assert "open-file limit 100" in limited.log()
    assert len(list((data / "collections").iterdir())) == 40  # nothing removed
    again = ServerProcess(tiny_checkpoint, data).start()
    try:
        assert _unavailable(again.address) == {}
        with Client(again.address) as c:
            assert len(c.collections()) == 40
    finally:
        assert again.stop() == 0, again.log()
