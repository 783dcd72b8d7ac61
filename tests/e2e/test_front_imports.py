"""A front with `--encoder ray --store milvus` holds neither the model nor the index library.

In a fresh interpreter, the test imports what `app._serve` imports and assembles what it
assembles for those engines (servicer, gRPC server with health and reflection, the HTTP door,
scikit-learn for Cluster, the Ray encoder's module, a Milvus Lite store opened and closed), then
asserts that torch, open_clip and hnswlib were never imported: the `front` extra installs none
of them. A watcher on the import system names the import chain that pulled one in.
(tests/e2e/test_server_e2e.py checks the running ray+milvus front's memory map for libtorch.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BANNED = ("torch", "torchvision", "open_clip", "hnswlib")

SCRIPT = textwrap.dedent("""
    import asyncio, json, sys, traceback

    BANNED = set(sys.argv[2].split(","))
    first_import = {}

    class Watcher:
        # Records where a banned top-level package is first imported; imports nothing itself.
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top in BANNED and top not in first_import:
                first_import[top] = "".join(traceback.format_stack(limit=40)[:-1])
            return None

    sys.meta_path.insert(0, Watcher())

    from clipsearch_server import analysis, app
    from clipsearch_server.doors.admission import CallBudgetInterceptor
    from clipsearch_server.doors.auth import TokenTable
    from clipsearch_server.config import parse_settings
    from clipsearch_server.encoders import ray_serve  # what open_encoder imports for ray
    from clipsearch_server.doors.http_server import HttpApp, HttpServer
    from clipsearch_server.observability import Metrics, ObservabilityInterceptor
    from clipsearch_server.service import ClipSearchServicer
    from clipsearch_server.stores import open_collections

    settings = parse_settings(["--encoder", "ray", "--store", "milvus", "--port", "0",
                               "--http-port", "0", "--data-dir", sys.argv[1]])

    async def assemble():
        metrics = Metrics()
        interceptors = [ObservabilityInterceptor(metrics),
                        CallBudgetInterceptor(settings.max_concurrent_rpcs,
                                              settings.max_open_streams)]
        server = app.grpc.aio.server(interceptors=interceptors)
        servicer = ClipSearchServicer(settings)
        app.clipsearch_pb2_grpc.add_ClipSearchServiceServicer_to_server(servicer, server)
        app.health_pb2_grpc.add_HealthServicer_to_server(app.health.aio.HealthServicer(),
                                                         server)
        app.reflection.enable_server_reflection([app.SERVICE_NAME], server)
        server.add_insecure_port("127.0.0.1:0")
        http = HttpServer(HttpApp(servicer, interceptors, settings, TokenTable([])), settings)
        http.sock.close()
        analysis.import_libraries()
        assert ray_serve.RayEncoder is not None
        collections = open_collections(settings, 64, "clipsearch-tiny/sha256:front-test")
        collections.open_all()
        collections.close_all()
        await server.stop(0)

    asyncio.run(assemble())
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BANNED)
    local = sorted(m for m in sys.modules if m.startswith("clipsearch_server.encoders.local"))
    print(json.dumps({"loaded": loaded, "encoders_local": local, "where": first_import}))
""")


def test_a_ray_milvus_front_imports_no_torch_open_clip_or_hnswlib(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    pytest.importorskip("pymilvus")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), ",".join(BANNED)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    where = "\n".join(f"{name} first imported at:\n{stack}"
                      for name, stack in found["where"].items())
    assert found["loaded"] == [], where
    assert found["encoders_local"] == []
