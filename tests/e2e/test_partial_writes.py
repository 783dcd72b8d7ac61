"""An upsert the client splits into several requests says which items were written."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from clipsearch import Client, PartialWriteError
from conftest import ServerProcess

DIM = 64


def test_split_upsert_that_partly_fails_names_what_was_written(tiny_checkpoint: Path,
                                                               tmp_path: Path) -> None:
    # The server takes requests up to 300 kB: 32 small items fit, 18 items of 30 kB do not.
    server = ServerProcess(tiny_checkpoint, tmp_path / "data",
                           "--max-message-bytes", "300000").start()
    ids = [f"item-{i:02d}" for i in range(50)]
    vectors = np.random.default_rng(9).normal(size=(50, DIM)).astype(np.float32)
    metadata = [{"i": i} if i < 32 else {"i": i, "pad": "x" * 30_000} for i in range(50)]
    try:
        with Client(server.address, batch_size=32) as c:
            with pytest.raises(PartialWriteError) as err:
                c.upsert("split", ids=ids, vectors=vectors, metadata=metadata)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.value.written_ids == ids[:32]
            assert err.value.not_written_ids == ids[32:]
            assert err.value.upserted == 32
            assert "32 items written, 18 not" in str(err.value)
            assert sorted(r.id for r in c.get("split", ids)) == ids[:32]
    finally:
        assert server.stop() == 0, server.log()
