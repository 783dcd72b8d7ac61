"""A real, private local Ray cluster for tests, and the tiny encoder deployed into it.

`ray start --head` runs as a subprocess on free ports with its own temp dir, so it cannot clash
with another cluster on the machine. It is stopped by killing exactly the processes that carry
that temp dir (not `ray stop`, which would stop every cluster of this user on the host). The
deployment is made by a short-lived subprocess driver, so the pytest process joins Ray only
through the RayEncoder under test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")
TINY_MODEL = "clipsearch-tiny"


@dataclass(frozen=True)
class RayCluster:
    """Where the test cluster listens and keeps its files."""

    address: str  # host:port of the GCS, what ray.init(address=...) takes
    temp_dir: Path

    def serve_logs(self) -> list[Path]:
        """The Serve log files of this cluster (for a failure message)."""
        return sorted((self.temp_dir / "session_latest" / "logs" / "serve").glob("*.log"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_of(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (our cluster's unique temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def _with_descendants(pids: set[int]) -> set[int]:
    """`pids` and every process below them (workers and agents are the raylet's children)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(") ", 1)[1].split()[1])
    found = set(pids)
    while True:
        more = {pid for pid, ppid in parents.items() if ppid in found} - found
        if not more:
            return found
        found |= more


def _kill_cluster(temp_dir: Path, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, the processes of this cluster (and their children) only."""
    pids = _with_descendants(set(_pids_of(str(temp_dir))))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        stop = time.monotonic() + grace_s
        while pids and time.monotonic() < stop:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)}
            time.sleep(0.1)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def local_ray_cluster(tmp_dir: Path, num_cpus: int = 2) -> Iterator[RayCluster]:
    """A Ray head on loopback for the duration of the block; its logs go under `tmp_dir`.

    Ray's socket paths must stay short (~107 bytes), so the session lives in a short /tmp dir
    and `tmp_dir` gets the output of `ray start`.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="csray-", dir="/tmp"))
    port = _free_port()
    cmd = [str(RAY), "start", "--head", "--num-cpus", str(num_cpus), "--num-gpus", "0",
           "--disable-usage-stats", "--include-dashboard=false",
           "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--ray-client-server-port", str(_free_port()),
           "--dashboard-port", str(_free_port()),
           "--dashboard-agent-listen-port", str(_free_port()),
           "--temp-dir", str(temp_dir)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    tmp_dir.mkdir(parents=True, exist_ok=True)
    log = tmp_dir / "ray-start.log"
    try:
        with open(log, "wb") as out:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                  timeout=120).returncode
        if code != 0:
            raise RuntimeError(f"ray start failed ({code}):\n{log.read_text(errors='replace')}")
        yield RayCluster(f"127.0.0.1:{port}", temp_dir)
    finally:
        _kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


_DEPLOY = textwrap.dedent("""
    import json, sys, time
    import ray
    from clipsearch_server.encoders.ray_deployment import deploy
    spec = json.loads(sys.argv[1])
    ray.init(address=spec["address"], logging_level="WARNING", log_to_driver=False)
    for app in spec["apps"]:
        started = time.perf_counter()
        deploy(app["model_args"], num_replicas=app["replicas"], name=app["name"],
               **app["options"])
        print(f"READY {app['name']} {time.perf_counter() - started:.2f}", flush=True)
""")


def tiny_model_args(checkpoint: Path, *extra: str) -> list[str]:
    """The `clipsearch serve` model flags of the tiny test model, exact fp32 on the CPU."""
    return ["--model", TINY_MODEL, "--checkpoint", str(checkpoint), "--device", "cpu",
            "--precision", "fp32", *extra]


def encoder_app(checkpoint: Path, replicas: int, app_name: str,
                extra_args: tuple[str, ...] = ("--no-jpeg-draft",), **options: object
                ) -> dict[str, object]:
    """One app for `deploy_encoders`: the tiny model; `options` go to the app builder."""
    return {"name": app_name, "replicas": replicas, "options": options,
            "model_args": tiny_model_args(checkpoint, *extra_args)}


def deploy_encoders(address: str, apps: list[dict[str, object]], timeout: float = 240.0
                    ) -> dict[str, float]:
    """Deploy apps in one driver subprocess; returns each app's seconds until it was ready.

    A subprocess (the apps outlive it) keeps the caller's process off Ray, and one driver for
    all apps pays Ray's start-up once.
    """
    import json

    spec = {"address": address, "apps": apps}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", _DEPLOY, json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    ready = {line.split()[1]: float(line.split()[2])
             for line in done.stdout.splitlines() if line.startswith("READY ")}
    if done.returncode != 0 or len(ready) != len(apps):
        raise RuntimeError(f"deploying {[a['name'] for a in apps]} failed ({done.returncode}):"
                           f"\n{done.stdout}\n{done.stderr[-4000:]}")
    return ready


def deploy_encoder(checkpoint: Path, replicas: int, app_name: str, address: str | None = None,
                   extra_args: tuple[str, ...] = ("--no-jpeg-draft",), **options: object
                   ) -> float:
    """Deploy the tiny model as Serve app `app_name` and wait; returns seconds until ready.

    `address` defaults to RAY_ADDRESS; `options` go to the app builder (e.g. num_cpus).
    """
    app = encoder_app(checkpoint, replicas, app_name, extra_args, **options)
    return deploy_encoders(address or os.environ.get("RAY_ADDRESS", "auto"), [app])[app_name]
