"""The committed stubs are what the proto generates, and the proto passes buf lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO = "clipsearch/v1/clipsearch.proto"
STUBS = ("clipsearch_pb2.py", "clipsearch_pb2.pyi", "clipsearch_pb2_grpc.py",
         "clipsearch_connect.py")
PLUGIN = Path(sys.executable).parent / "protoc-gen-connect-python"


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'protos'}",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         f"--plugin=protoc-gen-connect-python={PLUGIN}", f"--connect-python_out={tmp_path}",
         PROTO],
        check=True,
    )
    for name in STUBS:
        fresh = (tmp_path / "clipsearch" / "v1" / name).read_text()
        committed = (REPO / "client" / "clipsearch" / "v1" / name).read_text()
        assert committed == fresh, f"{name} is stale: run `make protos`"


def test_proto_passes_buf_lint() -> None:
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    if not Path(buf).exists():
        pytest.skip("buf is not installed (pip install buf-bin)")
    result = subprocess.run([buf, "lint"], cwd=REPO / "protos", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
