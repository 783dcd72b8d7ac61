"""GPU throughput: the whole path against the towers' own ceiling, measured in the same run.

For one model (ViT-B-32 by default; random weights cost the same compute as trained ones):

1. ceiling: the image tower alone on random pixel tensors already on the GPU, and the text
   tower alone on tokenised short captions, at the server's batch size;
2. image embedding through gRPC, JPEG bytes -> vectors (coco128 photos, many clients), with
   JPEGs decoded on the host (Pillow) and on the GPU (nvjpeg);
3. image ingest through gRPC, JPEG bytes -> indexed (Upsert into a collection);
4. short text queries per second at 32 and 256 clients through gRPC, and the gRPC front's own
   ceiling at the same concurrency (GetServerInfo, which does no model work).

Load comes from several client processes (the Python gRPC client is bound by its GIL), each
running threads with their own channel. Needs a CUDA GPU.

Run: python bench/bench_gpu.py --model ViT-B-32 --precision fp16
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from common import fmt, machine, ms, progress, section, start_server, table

from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco128"
WORDS = ["red", "small", "old", "happy", "wet", "shiny", "dog", "cat", "car", "boat", "pizza",
         "horse", "train", "beach", "bird", "clock", "in the park", "at night", "on a table"]
OPTIONS = [("grpc.max_send_message_length", 256 << 20),
           ("grpc.max_receive_message_length", 256 << 20)]


def captions(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [f"a photo of a {' '.join(rng.choice(WORDS, 3))} {i}" for i in range(n)]


# --- the server -----------------------------------------------------------------------------
def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


# --- load from several processes --------------------------------------------------------------
def _client_process(args: tuple) -> tuple[int, list[float], int]:
    """One process: `threads` threads, each with its own channel, calling until `stop`."""
    address, kind, threads, warm_at, stop_at, payload, start_id = args
    done = [0] * threads
    lat: list[list[float]] = [[] for _ in range(threads)]
    errors = [0]

    def loop(t: int) -> None:
        channel = grpc.insecure_channel(address, options=OPTIONS)
        stub = pb_grpc.ClipSearchServiceStub(channel)
        counter = itertools.count()
        while time.time() < stop_at:
            i = next(counter)
            began = time.perf_counter()
            try:
                if kind == "text":
                    stub.EmbedTexts(pb.EmbedTextsRequest(texts=[payload[(t * 7919 + i)
                                                                        % len(payload)]]),
                                    timeout=60)
                    n = 1
                elif kind == "info":
                    stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=60)
                    n = 1
                elif kind == "embed":
                    stub.EmbedImages(pb.EmbedImagesRequest(images=payload), timeout=120)
                    n = len(payload)
                else:  # "ingest:COLLECTION"
                    base = f"{start_id}-{t}-{i}"
                    items = [pb.Item(id=f"{base}-{j}", image=data)
                             for j, data in enumerate(payload)]
                    stub.UpsertItems(pb.UpsertItemsRequest(
                        collection=kind.split(":", 1)[1], items=items), timeout=120)
                    n = len(payload)
            except grpc.RpcError:
                errors[0] += 1
                continue
            if time.time() >= warm_at:  # calls during the warm-up are not counted
                lat[t].append(time.perf_counter() - began)
                done[t] += n
        channel.close()

    workers = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done), [x for per in lat for x in per], errors[0]


def load(address: str, kind: str, clients: int, seconds: float, payload: list,
         processes: int) -> tuple[float, float, float, int]:
    """(items per second, p50 ms, p99 ms, errors) with `clients` threads over `processes`."""
    processes = max(1, min(processes, clients))
    per = [clients // processes + (1 if p < clients % processes else 0) for p in range(processes)]
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(abs, range(processes))  # the workers are up before the clock starts
        warm_at = time.time() + 3.0
        stop_at = warm_at + seconds
        results = pool.map(_client_process, [(address, kind, n, warm_at, stop_at, payload, p)
                                             for p, n in enumerate(per)])
    done = sum(r[0] for r in results)
    lat = [x for r in results for x in r[1]]
    elapsed = seconds
    p50, p99 = ms(lat) if lat else (float("nan"), float("nan"))
    return done / elapsed, p50, p99, sum(r[2] for r in results)


# --- the ceiling ------------------------------------------------------------------------------
def ceiling(model_name: str, device: str, precision: str, batch: int, seconds: float
            ) -> tuple[float, float]:
    """(images/s, texts/s) of the towers alone, inputs already on the GPU."""
    from clipsearch_server.config import Settings
    from clipsearch_server.encoders.local.model import load_model

    model = load_model(Settings(model=model_name, pretrained=None, random_weights=True,
                                device=device, precision=precision))
    size = model.image_size
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=model.dtype)
    if model.channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    tokens = model.tokenizer(captions(batch)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rates = []
    for run in (lambda: model.module.encode_image(pixels),
                lambda: model.module.encode_text(tokens)):
        with torch.inference_mode():
            for _ in range(3):
                run()
            sync()
            n, began = 0, time.perf_counter()
            while time.perf_counter() - began < seconds:
                run()
                n += batch
            sync()
            rates.append(n / (time.perf_counter() - began))
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--device", default="cuda", help="cpu only to try the script")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=256, help="server --max-batch-size")
    parser.add_argument("--processes", type=int, default=8, help="client processes")
    parser.add_argument("--per-request", type=int, default=32, help="images per request")
    parser.add_argument("--image-clients", type=int, default=32)
    parser.add_argument("--text-clients", default="32,256")
    parser.add_argument("--decode", default="off,on", help="--device-decode settings to run")
    parser.add_argument("--tables", default="ceiling,images,ingest,text")
    parser.add_argument("--server-args", default="", help="extra server flags")
    parser.add_argument("--thumbnails", default="256,0",
                        help="thumbnail sizes of the ingest runs' collections (0 = none)")
    parser.add_argument("--work-dir", type=Path, help="keep data and server logs here")
    args = parser.parse_args()
    tables = args.tables.split(",")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none"
    print(f"Machine: {machine()}; GPU: {gpu}; torch {torch.__version__}")
    print(f"Model: {args.model} (random weights), {args.precision}, server batch {args.batch}")
    jpegs = [f.read_bytes() for f in sorted(COCO.rglob("*.jpg"))]
    payload = (jpegs * (args.per_request // len(jpegs) + 1))[: args.per_request]
    rows: list[list[object]] = []

    def add(row: list[object]) -> None:
        """Keep a row for the table, and print it at once (a cut-off run keeps its numbers)."""
        row = row + [""] * (6 - len(row))
        rows.append(row)
        print("| " + " | ".join(fmt(v) for v in row) + " |", flush=True)

    if "ceiling" in tables:
        progress("ceiling: towers alone")
        img_rate, text_rate = ceiling(args.model, args.device, args.precision, args.batch,
                                      args.seconds)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        add(["image tower alone, random tensors on the GPU", img_rate, "", "", 1.0])
        add(["text tower alone, tokenised captions on the GPU", text_rate, "", "", ""])
    else:
        img_rate = float("nan")
    base = ["--max-message-bytes", str(256 << 20), "--precision", args.precision,
            "--max-batch-size", str(args.batch),
            "--text-cache-size", "0", "--decode-threads", "12", "--max-concurrent-rpcs", "1024",
            "--max-queued-batches", "4096", *args.server_args.split()]
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.work_dir or Path(scratch)
        for decode in args.decode.split(","):
            if not ({"images", "ingest"} & set(tables)) and decode != "off":
                continue
            proc, address = start_server(args.model,
                                         Path(tmp) / f"{args.model}-{decode}" / "data",
                                         [*base, "--device-decode", decode], args.device)
            try:
                if "images" in tables:
                    progress(f"images: embed, device decode {decode}")
                    rate, p50, p99, err = load(address, "embed", args.image_clients,
                                               args.seconds, payload, args.processes)
                    add([f"JPEG bytes -> vectors, gRPC, decode on "
                                 f"{'GPU' if decode == 'on' else 'CPU'}", rate, p50, p99,
                                 rate / img_rate, err])
                for size in (int(x) for x in args.thumbnails.split(",")
                             if "ingest" in tables):
                    progress(f"images: ingest, device decode {decode}, thumbnails {size}")
                    name = f"bench-t{size}"
                    with grpc.insecure_channel(address) as channel:
                        pb_grpc.ClipSearchServiceStub(channel).CreateCollection(
                            pb.CreateCollectionRequest(name=name, thumbnail_size=size))
                    rate, p50, p99, err = load(address, f"ingest:{name}", args.image_clients,
                                               args.seconds, payload, args.processes)
                    add([f"JPEG bytes -> indexed (Upsert), decode on "
                         f"{'GPU' if decode == 'on' else 'CPU'}, thumbnails {size or 'off'}",
                         rate, p50, p99, rate / img_rate, err])
                if "text" in tables and decode == args.decode.split(",")[0]:
                    texts = captions(20_000)
                    for clients in (int(c) for c in args.text_clients.split(",")):
                        progress(f"text: {clients} clients")
                        rate, p50, p99, err = load(address, "text", clients, args.seconds,
                                                   texts, args.processes)
                        add([f"short text queries, {clients} clients", rate, p50, p99,
                                     "", err])
                        rate, p50, p99, err = load(address, "info", clients, args.seconds,
                                                   texts, args.processes)
                        add([f"gRPC front alone (GetServerInfo), {clients} clients",
                                     rate, p50, p99, "", err])
            finally:
                stop_server(proc)
    section(f"{args.model}, {args.precision}, on {gpu} ({args.device})",
            table(["path", "per second", "p50 ms", "p99 ms", "of image ceiling", "errors"],
                  rows))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
