"""Shared fixtures: a tiny CLIP checkpoint and a real server process on a loopback port.

The model is open_clip's own CLIP class built from our `clipsearch-tiny` config with seeded
random weights, saved with torch.save and loaded back by the server through `--checkpoint`,
the same path a user's real weights take.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco128"
TINY_MODEL = "clipsearch-tiny"
# The device the test servers run on: cpu here and in CI; `CLIPSEARCH_TEST_DEVICE=cuda` runs
# the suite's servers on a GPU machine.
TEST_DEVICE = os.environ.get("CLIPSEARCH_TEST_DEVICE", "cpu")


def coco_images(limit: int | None = None) -> list[Path]:
    """The real photos of shared/data/coco128, or a skip when they are absent."""
    if not COCO.is_dir():
        pytest.skip(f"test photos not found at {COCO} (see shared/data/README.md)")
    files = sorted(COCO.rglob("*.jpg"))
    return files[:limit] if limit else files


def save_tiny_checkpoint(path: Path, seed: int) -> Path:
    """open_clip's CLIP built from the tiny config with seeded random weights, saved."""
    import open_clip
    import torch

    from clipsearch_server.catalog import bundled_config_dir

    open_clip.add_model_config(bundled_config_dir())
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(TINY_MODEL).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt", 1234)


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No CLIPSEARCH_* variable from the caller's environment reaches the settings."""
    for key in list(os.environ):
        if key.startswith("CLIPSEARCH_"):
            monkeypatch.delenv(key)
    return monkeypatch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m clipsearch_server` as a child process, started and stopped by tests."""

    started: ClassVar[list[ServerProcess]] = []  # so that a failed test cannot leak a server

    def __init__(self, checkpoint: Path, data_dir: Path, *extra: str,
                 env: dict[str, str] | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.checkpoint = checkpoint
        self.data_dir = data_dir
        self.extra = list(extra)
        self.env = env or {}
        self.credentials = credentials  # how the readiness probe connects (TLS servers)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.http_port = free_port()  # never the default 8080: tests run side by side
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # --backend auto picks torch or ONNX Runtime by the CPU's bf16: the suite pins torch
        # so it tests the same thing on every CPU; tests/e2e/test_onnx_backend.py runs ONNX.
        backend = [] if "--backend" in self.extra else ["--backend", "torch"]
        cmd = [sys.executable, "-m", "clipsearch_server", "--host", "127.0.0.1",
               "--port", str(self.port), "--model", TINY_MODEL,
               "--checkpoint", str(self.checkpoint), "--data-dir", str(self.data_dir),
               "--device", TEST_DEVICE, "--http-port", str(self.http_port), *backend,
               *self.extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        ServerProcess.started.append(self)
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        channel = (grpc.secure_channel(f"localhost:{self.port}", self.credentials)
                   if self.credentials else grpc.insecure_channel(self.address))
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"server not serving after {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_servers() -> Iterator[None]:
    yield
    for proc in ServerProcess.started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("server") / "data").start()
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        assert proc.stop() == 0, proc.log()


# The engine combinations the API-level suite runs on (README, "Scaling out"): the default
# in-process encoder with the local store, the local encoder with Milvus Lite, and a Ray Serve
# encoder (a local Ray started once per session) with Milvus Lite.
BACKENDS = ["local", "milvus", "ray+milvus"]


class Engine:
    """Which encoder and store a test server uses: the flags that choose them."""

    def __init__(self, name: str, ray_address: str = "", ray_app: str = "") -> None:
        self.name = name
        self.args: list[str] = []
        if "milvus" in name:
            self.args += ["--store", "milvus"]  # a Milvus Lite file in the data dir
        if name.startswith("ray"):
            self.args += ["--encoder", "ray", "--ray-address", ray_address, "--ray-app", ray_app]

    @property
    def local_store(self) -> bool:
        return "milvus" not in self.name

    def __repr__(self) -> str:
        return self.name


RAY_APP = "enc-test"  # two replicas of the tiny model, the default limits
RAY_TIGHT_APP = "enc-tight"  # one replica with tiny queues, for the overload paths


@pytest.fixture(scope="session")
def ray_cluster(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One local Ray head per session with the test encoders deployed (Ray starts slowly)."""
    pytest.importorskip("ray")
    from ray_cluster import deploy_encoders, encoder_app, local_ray_cluster

    with local_ray_cluster(tmp_path_factory.mktemp("ray")) as cluster:
        tight_args = ("--no-jpeg-draft", "--max-batch-size", "2", "--max-queued-batches", "1")
        deploy_encoders(cluster.address, [
            encoder_app(tiny_checkpoint, 2, RAY_APP),
            encoder_app(tiny_checkpoint, 1, RAY_TIGHT_APP, tight_args, num_cpus=0,
                        max_ongoing_requests=1, max_queued_requests=1)])
        yield cluster


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request: pytest.FixtureRequest) -> Engine:
    if request.param.startswith("ray"):
        cluster = request.getfixturevalue("ray_cluster")
        return Engine(request.param, cluster.address, RAY_APP)
    if "milvus" in request.param:
        pytest.importorskip("pymilvus")
    return Engine(request.param)


@pytest.fixture()
def client(server: ServerProcess) -> Iterator:
    from clipsearch import Client

    with Client(server.address) as c:
        yield c
