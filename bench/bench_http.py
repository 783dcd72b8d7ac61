"""HTTP door against gRPC on the same queries, and what thumbnails cost.

Starts one server (ViT-B-32, random weights, CPU), indexes the coco128 photos through gRPC,
then times the same Search calls, one at a time, through
  - gRPC (the generated stub, protobuf),
  - Connect JSON over HTTP/1.1 (keep-alive http.client; JSON encoded and parsed in the client),
  - Connect binary (application/proto) over HTTP/1.1,
interleaved in rounds so that other load on the machine hits every protocol alike.
The thumbnail section reports the stored WebP sizes per item and the time to make them.

    .venv/bin/python bench/bench_http.py [--calls 600] [--model ViT-B-32]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from common import load, machine, ms, progress, section, table
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco128"
SEARCH = "/clipsearch.v1.ClipSearchService/Search"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, data_dir: Path) -> tuple[subprocess.Popen, int, int]:
    port, http_port = free_port(), free_port()
    log = open(data_dir.parent / "server.log", "wb")  # noqa: SIM115 - lives with the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipsearch_server", "--port", str(port), "--http-port",
         str(http_port), "--model", model, "--random-weights", "--data-dir", str(data_dir),
         "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(1200):
            if proc.poll() is not None:
                raise RuntimeError("server exited; see server.log")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc, port, http_port
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError("server did not become ready")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=600, help="calls per protocol and query")
    parser.add_argument("--model", default="ViT-B-32")
    args = parser.parse_args(argv)
    files = sorted(COCO.rglob("*.jpg"))
    if not files:
        sys.exit(f"no photos under {COCO}")
    print(f"Machine: {machine()}\nModel: {args.model} (random weights), CPU; {load()} at start")

    with tempfile.TemporaryDirectory() as tmp:
        proc, port, http_port = start_server(args.model, Path(tmp) / "data")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.ClipSearchServiceStub(channel)
                ingest_table(stub, files)
                latency_table(stub, http_port, files, args.calls)
                thumbnail_table(stub, files)
        finally:
            proc.terminate()
            proc.wait(60)


def ingest_table(stub: pb_grpc.ClipSearchServiceStub, files: list[Path]) -> None:
    """Index the photos twice, with and without thumbnails, batch by batch in turn."""
    stub.CreateCollection(pb.CreateCollectionRequest(name="bench-plain", thumbnail_size=0))
    seconds = {"bench": 0.0, "bench-plain": 0.0}
    progress(f"indexing {len(files)} photos twice (with and without thumbnails)")
    for start in range(0, len(files), 32):
        batch = files[start:start + 32]
        items = [pb.Item(id=f.name, image=f.read_bytes()) for f in batch]
        for item, f in zip(items, batch, strict=True):
            item.metadata.update({"path": f.name, "size": f.stat().st_size})
        order = ["bench", "bench-plain"] if start % 64 == 0 else ["bench-plain", "bench"]
        for collection in order:
            started = time.perf_counter()
            stub.UpsertItems(pb.UpsertItemsRequest(collection=collection, items=items))
            seconds[collection] += time.perf_counter() - started
    with_thumbs, without = len(files) / seconds["bench"], len(files) / seconds["bench-plain"]
    section("Image ingest with and without thumbnails (one client, batches of 32)",
            table(["collection", "img/s", "ratio"],
                  [["thumbnails 256 px (default)", with_thumbs, with_thumbs / without],
                   ["no thumbnails (thumbnail_size 0)", without, 1.0]]))


def latency_table(stub: pb_grpc.ClipSearchServiceStub, http_port: int, files: list[Path],
                  calls: int) -> None:
    queries = {
        "text, k=10 (cached embedding)": {"collection": "bench", "text": "a dog", "k": 10},
        "id, k=10": {"collection": "bench", "id": files[0].name, "k": 10},
        "id, k=100": {"collection": "bench", "id": files[0].name, "k": 100},
    }
    conn = http.client.HTTPConnection("127.0.0.1", http_port)
    json_headers = {"Content-Type": "application/json"}
    proto_headers = {"Content-Type": "application/proto"}

    def via_grpc(q: dict) -> int:
        return len(stub.Search(pb.SearchRequest(**q)).hits)

    def via_json(q: dict) -> int:
        conn.request("POST", SEARCH, body=json.dumps(q), headers=json_headers)
        reply = conn.getresponse()
        body = json.loads(reply.read())
        assert reply.status == 200, body
        return len(body["hits"])

    def via_proto(q: dict) -> int:
        conn.request("POST", SEARCH, body=pb.SearchRequest(**q).SerializeToString(),
                     headers=proto_headers)
        reply = conn.getresponse()
        data = reply.read()
        assert reply.status == 200, data
        return len(pb.SearchResponse.FromString(data).hits)

    protocols = {"gRPC": via_grpc, "Connect JSON": via_json, "Connect binary": via_proto}
    rows = []
    for name, query in queries.items():
        progress(f"timing {name}")
        times: dict[str, list[float]] = {p: [] for p in protocols}
        for call in protocols.values():  # warm up: caches, connections
            for _ in range(20):
                call(query)
        for _ in range(0, calls, 50):
            for protocol, call in protocols.items():
                for _ in range(50):
                    started = time.perf_counter()
                    call(query)
                    times[protocol].append(time.perf_counter() - started)
        base = ms(times["gRPC"])[0]
        for protocol in protocols:
            p50, p99 = ms(times[protocol])
            p90 = float(np.percentile(np.asarray(times[protocol]) * 1e3, 90))
            rows.append([name, protocol, p50, p90, p99, p50 - base])
    conn.close()
    section(f"Search latency, one call at a time ({calls} calls each)",
            table(["query", "protocol", "p50 ms", "p90 ms", "p99 ms", "p50 - gRPC ms"], rows))


def thumbnail_table(stub: pb_grpc.ClipSearchServiceStub, files: list[Path]) -> None:
    from clipsearch_server.thumbnails import make_thumbnail

    items = stub.ListItems(pb.ListItemsRequest(collection="bench", page_size=1000,
                                               include_thumbnails=True)).items
    sizes = np.array([len(i.thumbnail) for i in items], dtype=np.float64)
    images = np.array([f.stat().st_size for f in files], dtype=np.float64)
    rows = [["WebP thumbnail, long side 256 (default)", float(np.mean(sizes)) / 1024,
             float(np.median(sizes)) / 1024, float(np.max(sizes)) / 1024],
            ["the original JPEG", float(np.mean(images)) / 1024,
             float(np.median(images)) / 1024, float(np.max(images)) / 1024],
            ["vector, 512 float32", 2.0, 2.0, 2.0]]
    section(f"Stored bytes per item, coco128 ({len(items)} photos)",
            table(["what", "mean KiB", "median KiB", "max KiB"], rows))
    data = [f.read_bytes() for f in files]
    rows = []
    for size in (128, 256, 512):
        started = time.perf_counter()
        out = [make_thumbnail(d, size, 40_000_000) for d in data]
        elapsed = time.perf_counter() - started
        rows.append([size, elapsed / len(data) * 1e3, float(np.mean([len(t) for t in out])) / 1024])
    section("Making thumbnails in-process (one thread)",
            table(["long side px", "ms per photo", "mean KiB"], rows))


if __name__ == "__main__":
    main()
