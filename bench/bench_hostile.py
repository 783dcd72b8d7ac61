"""Search while hostile callers abandon heavy calls, and memory of a reply of repeated ids.

Issue 18's attack pass, as a benchmark: a collection of 5,000 vectors; search latency (vector
queries, k=10, on another collection) idle, then while 8 FindDuplicates (neighbors 100,
ef 4096) and 8 Cluster (1,000 clusters) calls are sent and abandoned by their clients after
`--abandon-s`; how long after the last abandonment the heavy work is gone (a new Cluster call
answers); and the server's RSS growth for GetItems of 4,096 copies of one id with 1024 px
thumbnails. Each tree given (this one, and with `--baseline-tree` an older checkout, e.g. a
`git worktree` of the last landed commit) runs its own server with random ViT-B-32 weights, one
after the other in the same run.

Run: .venv/bin/python bench/bench_hostile.py --baseline-tree /tmp/landed   (~3 min)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from common import load, machine, ms, progress, section, start_server, table
from PIL import Image

from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

ITEMS = 5000


def start(tree: Path | None, data_dir: Path) -> tuple[subprocess.Popen, str]:
    """A server from `tree` (None: the installed one), SERVING, with its address."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = f"{tree / 'server'}:{tree / 'client'}"
    return start_server("ViT-B-32", data_dir, env=env)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def searches(stub: pb_grpc.ClipSearchServiceStub, dim: int, seconds: float) -> list[float]:
    query = np.random.default_rng(3).normal(size=dim).astype("<f4")
    request = pb.SearchRequest(collection="small", k=10,
                               vector=pb.Vector(data=query.tobytes(), dim=dim))
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start_ = time.monotonic()
        try:
            stub.Search(request, timeout=30)
            out.append(time.monotonic() - start_)
        except grpc.RpcError:
            out.append(30.0)  # a failed search counts as the worst latency
        time.sleep(0.005)
    return out


def noise_jpeg() -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (1024, 1024, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def measure(tree: Path | None, folder: Path, seconds: float, abandon_s: float) -> dict:
    proc, address = start(tree, folder / "data")
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.ClipSearchServiceStub(channel)
            dim = stub.GetServerInfo(pb.GetServerInfoRequest()).dim
            rng = np.random.default_rng(5)
            for name, n in (("small", 20), ("five-k", ITEMS)):
                v = rng.normal(size=(n, dim)).astype("<f4")
                for start_ in range(0, n, 1000):
                    stub.UpsertItems(pb.UpsertItemsRequest(collection=name, items=[
                        pb.Item(id=f"{name}-{i}", vector=pb.Vector(data=v[i].tobytes(), dim=dim))
                        for i in range(start_, min(n, start_ + 1000))]), timeout=120)
            progress("idle searches")
            idle = searches(stub, dim, seconds)
            progress("searches while 16 heavy calls are abandoned")
            calls = []
            for _ in range(8):
                calls.append(stub.FindDuplicates.future(pb.FindDuplicatesRequest(
                    collection="five-k", neighbors=100, ef=4096), timeout=abandon_s))
                calls.append(stub.Cluster.future(pb.ClusterRequest(
                    collection="five-k", n_clusters=1000), timeout=abandon_s))
            busy = searches(stub, dim, seconds)
            for call in calls:
                with contextlib.suppress(grpc.RpcError):
                    call.result()
            abandoned = time.monotonic()
            progress("waiting for the heavy work to be gone")
            probe = pb.ClusterRequest(collection="small", n_clusters=2)
            while True:  # a Cluster answered promptly: nothing heavy is left running
                asked = time.monotonic()
                try:
                    stub.Cluster(probe, timeout=600)
                    if time.monotonic() - asked < 1.0:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
            free_after = time.monotonic() - abandoned
            progress("GetItems of 4,096 copies of one id with thumbnails")
            stub.CreateCollection(pb.CreateCollectionRequest(name="thumbs", thumbnail_size=1024))
            stub.UpsertItems(pb.UpsertItemsRequest(collection="thumbs", items=[
                pb.Item(id="t0", image=noise_jpeg())]), timeout=120)
            before = rss_mib(proc.pid)
            started = time.monotonic()
            try:
                reply = stub.GetItems(pb.GetItemsRequest(collection="thumbs", ids=["t0"] * 4096,
                                                         include_thumbnails=True), timeout=300)
                outcome = f"{len(reply.items)} item"
            except grpc.RpcError as exc:
                outcome = exc.code().name
            get_s = time.monotonic() - started
            grown = rss_mib(proc.pid) - before
        return {"idle": ms(idle), "busy": ms(busy), "free": free_after, "rss": grown,
                "get": outcome, "get_s": get_s}
    finally:
        proc.terminate()
        proc.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-tree", type=Path, help="an older checkout to compare with")
    parser.add_argument("--seconds", type=float, default=8.0, help="each search phase")
    parser.add_argument("--abandon-s", type=float, default=5.0,
                        help="the heavy calls' client deadline")
    args = parser.parse_args()
    print(f"{machine()}\n{load()}")
    trees = [("this tree", None)]
    if args.baseline_tree:
        trees.append((f"baseline ({args.baseline_tree})", args.baseline_tree.resolve()))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        for label, tree in trees:
            progress(label)
            folder = Path(tmp) / label.split()[0]
            folder.mkdir()
            r = measure(tree, folder, args.seconds, args.abandon_s)
            rows.append([label, r["idle"][0], r["idle"][1], r["busy"][0], r["busy"][1],
                         r["busy"][1] / r["idle"][1], r["free"], r["get"], r["get_s"],
                         r["rss"]])
    section("Search beside abandoned heavy calls; a reply of 4,096 copies of one id", table(
        ["server", "idle p50 ms", "idle p99 ms", "busy p50 ms", "busy p99 ms",
         "p99 busy/idle", "heavy work gone after (s)", "GetItems x4096", "GetItems s",
         "RSS growth MiB"], rows))
    print(f"\n{load()}")


if __name__ == "__main__":
    main()
