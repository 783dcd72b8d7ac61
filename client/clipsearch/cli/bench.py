"""The bench command: how fast this server ingests and answers, to compare hardware.

It writes to a scratch collection that it creates and always drops, uploads through the
client's normal upsert path from several threads, sends varied short text searches, and sets
both against each tower's own speed as the server measured it (its ceiling), so that a slow
result says whether the model or everything around it is the limit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from clipsearch.cli.options import collection_name, positive_int
from clipsearch.client import Client
from clipsearch.errors import BatchError, ClipSearchError
from clipsearch.images import discover_images
from clipsearch.results import ServerInfo

NOT_REPORTED = "ceiling: not reported by this server"
# Varied query texts: no text cache on the server answers them all.
WORDS = ("dog", "cat", "beach", "city street", "mountain", "kitchen", "bicycle", "pizza",
         "train", "sunset", "child", "boat", "forest", "car", "bird", "market")


def add_commands(commands: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    bench = commands.add_parser(
        "bench", parents=[parent], help="measure ingest and query speed against the server",
        description="Upload images from DIR into a scratch collection (created here and "
        "dropped at the end, even on errors or Ctrl-C), then send short text searches; print "
        "img/s, q/s, p50/p99 and each rate against the tower's own speed on the server.")
    bench.add_argument("--images", required=True, metavar="DIR",
                       help="folder of images to upload, cycled to --count")
    bench.add_argument("--collection", type=collection_name, metavar="NAME",
                       help="name of the scratch collection; must not exist (default: "
                       "bench-<random hex>)")
    bench.add_argument("--count", type=positive_int, default=256, metavar="N",
                       help="images to upload (default: 256)")
    bench.add_argument("--clients", type=positive_int, default=4, metavar="K",
                       help="uploading threads (default: 4)")
    bench.add_argument("--queries", type=positive_int, default=200, metavar="N",
                       help="text searches (default: 200)")
    bench.add_argument("--query-clients", type=positive_int, default=8, metavar="K",
                       help="searching threads (default: 8)")
    bench.add_argument("--during-ingest", action="store_true",
                       help="also upload --count more images while searching without pause, "
                       "to measure query latency during bulk indexing")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead")
    bench.set_defaults(run=_bench, check=_check)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not Path(args.images).is_dir():
        parser.error(f"--images {args.images}: not a directory")


@dataclass
class Phase:
    """One measured load: ingest (img/s, image tower) or queries (q/s, text tower)."""

    tower: str
    clients: int
    count: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    failed: list[BatchError] = field(default_factory=list, repr=False)
    ended: list[float] = field(default_factory=list, repr=False)  # when each uploader ended

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None


def _bench(client: Client, args: argparse.Namespace) -> int:
    info = client.info()
    root = Path(args.images)
    files = discover_images(root).images[: args.count]
    if not files:
        print(f"error: no images found in {root}", file=sys.stderr)
        return 1
    photos = [(root / rel).read_bytes() for rel in files]
    name = args.collection or f"bench-{secrets.token_hex(4)}"
    try:
        client.create_collection(name)
    except ClipSearchError as exc:
        if exc.code != grpc.StatusCode.ALREADY_EXISTS:
            raise
        print(f"error: collection {name!r} already exists; bench writes to a scratch collection "
              "and drops it at the end, so name one that does not exist", file=sys.stderr)
        return 1
    try:
        phases = _measure(client, args, name, photos)
        after = client.info()  # tower speeds may be measured only once bulk work has run
    finally:
        _drop(client, name)
    failures = [e for p in phases.values() for e in p.failed]
    if args.json:
        print(json.dumps(_report(args, info, after, name, len(files), phases)))
    else:
        _print_table(args, info, after, name, len(files), phases)
    if failures:
        print(f"error: some images failed: {failures[0].details}", file=sys.stderr)
        return 1
    return 0


def _measure(client: Client, args: argparse.Namespace, name: str,
             photos: list[bytes]) -> dict[str, Phase]:
    """Warm-up, then the phases; every thread has returned when this does, even on Ctrl-C."""
    texts = (f"a photo of {WORDS[i % len(WORDS)]} {i}" for i in itertools.count())
    next_text = _locked(texts)
    _say(args, "warm-up")  # the first calls of each batch size prepare kernels: not measured
    client.embed_images(photos[: client.batch_size])
    _run(*_searchers(client, name, next_text, Phase("text", args.query_clients),
                     lambda done: done >= args.query_clients))
    _say(args, f"ingest: {args.count} images from {args.clients} clients")
    phases = {"ingest": _run(*_uploaders(client, name, photos, "a", Phase("image", args.clients),
                                         args.count))}
    _say(args, f"queries: {args.queries} from {args.query_clients} clients")
    phases["query"] = _run(*_searchers(client, name, next_text,
                                       Phase("text", args.query_clients),
                                       lambda done: done >= args.queries))
    if args.during_ingest:
        _say(args, f"ingest of {args.count} more images with queries running")
        ingest = Phase("image", args.clients)
        uploaders, _ = _uploaders(client, name, photos, "b", ingest, args.count)
        searchers, query = _searchers(  # at least one search each, then until ingest is done
            client, name, next_text, Phase("text", args.query_clients),
            lambda done: done >= args.query_clients and len(ingest.ended) == args.clients)
        began = time.perf_counter()
        _run(uploaders + searchers, query)
        ingest.seconds = max(ingest.ended) - began
        phases["ingest_during_queries"], phases["query_during_ingest"] = ingest, query
    return phases


def _uploaders(client: Client, name: str, photos: list[bytes], tag: str, phase: Phase,
               count: int) -> tuple[list[Callable[[threading.Event], None]], Phase]:
    """One thread per client, each sending its share of `count` images through upsert."""
    lock = threading.Lock()
    chunk = client.batch_size * client.pipeline * 2  # a few batches per call: stop between

    def upload(worker: int, stop: threading.Event) -> None:
        mine = range(worker, count, phase.clients)
        try:
            for start in range(0, len(mine), chunk):
                if stop.is_set():
                    return
                part = mine[start : start + chunk]
                try:
                    written = client.upsert(name, ids=[f"{tag}{i}" for i in part],
                                            images=[photos[i % len(photos)] for i in part])
                except BatchError as exc:
                    written = exc.upserted or 0
                    with lock:
                        phase.failed.append(exc)
                with lock:
                    phase.count += written
        finally:
            with lock:
                phase.ended.append(time.perf_counter())

    return [lambda stop, w=w: upload(w, stop) for w in range(phase.clients)], phase


def _searchers(client: Client, name: str, next_text: Callable[[], str], phase: Phase,
               enough: Callable[[int], bool]) -> tuple[list[Callable[[threading.Event], None]],
                                                       Phase]:
    """Closed-loop searching threads; `enough(searches started)` says when to stop."""
    started = _locked(itertools.count(1))
    lock = threading.Lock()

    def search(stop: threading.Event) -> None:
        while not stop.is_set() and not enough(started() - 1):
            begin = time.perf_counter()
            client.search(name, text=next_text(), k=10)
            with lock:
                phase.latencies_ms.append((time.perf_counter() - begin) * 1000)
                phase.count += 1

    return [search] * phase.clients, phase


def _run(targets: list[Callable[[threading.Event], None]], phase: Phase) -> Phase:
    """Runs the targets on threads and times them; the first error (or Ctrl-C) stops them
    all and is raised once all have returned, so nothing is written after the drop."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def guard(fn: Callable[[threading.Event], None]) -> None:
        try:
            fn(stop)
        except BaseException as exc:  # handed to the main thread, raised there
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=guard, args=(fn,), daemon=True) for fn in targets]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except BaseException:
        stop.set()
        print("stopping: waiting for the calls in flight", file=sys.stderr)
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]
    phase.seconds = time.perf_counter() - begin
    return phase


def _locked(iterator: Any) -> Callable[[], Any]:
    lock = threading.Lock()

    def take() -> Any:
        with lock:
            return next(iterator)
    return take


def _drop(client: Client, name: str) -> None:
    try:
        client.drop_collection(name)
    except ClipSearchError as exc:
        print(f"warning: could not drop the scratch collection {name!r} ({exc}); "
              f"drop it with: clipsearch drop --collection {name}", file=sys.stderr)


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(f"... {message}", file=sys.stderr, flush=True)


LABELS = {"ingest": "ingest", "query": "queries", "ingest_during_queries": "ingest + queries",
          "query_during_ingest": "queries + ingest"}
UNITS = {"image": "img/s", "text": "q/s"}


def _of_ceiling(phase: Phase, info: ServerInfo) -> float | None:
    """The end-to-end rate as a share of the tower's own measured speed, when reported."""
    tuning = info.towers.get(phase.tower)
    if tuning is None or tuning.inputs_per_second <= 0:
        return None
    return phase.per_second / tuning.inputs_per_second


def _report(args: argparse.Namespace, before: ServerInfo, after: ServerInfo, name: str,
            files: int, phases: dict[str, Phase]) -> dict[str, Any]:
    """Every number, for scripts (--json)."""
    keep = ("model", "pretrained", "random_weights", "device", "backend", "backend_reason",
            "precision", "precision_reason", "version")
    out: dict[str, Any] = {"server": args.server, **{k: getattr(before, k) for k in keep}}
    out.update(collection=name, image_files=files, phases={}, towers={
        tower: asdict(tuning) for tower, tuning in after.towers.items()})
    for key, p in phases.items():
        out["phases"][key] = {
            "tower": p.tower, "clients": p.clients, "count": p.count,
            "seconds": round(p.seconds, 4), "per_second": round(p.per_second, 3),
            "unit": UNITS[p.tower], "failed": sum(len(e.errors) for e in p.failed),
            "of_ceiling": _of_ceiling(p, after)}
        if p.tower == "text":
            out["phases"][key].update(p50_ms=_ms(p.percentile(50)), p99_ms=_ms(p.percentile(99)))
    return out


def _print_table(args: argparse.Namespace, before: ServerInfo, after: ServerInfo, name: str,
                 files: int, phases: dict[str, Phase]) -> None:
    def why(value: str, reason: str) -> str:
        return f"{value or 'not reported'}" + (f" ({reason})" if reason else "")

    model = before.model + (f" ({before.pretrained})" if before.pretrained else "")
    model += ", random weights" if before.random_weights else ""
    for label, value in (("server", f"{args.server} (version {before.version})"),
                         ("model", model), ("device", before.device),
                         ("backend", why(before.backend, before.backend_reason)),
                         ("precision", why(before.precision, before.precision_reason)),
                         ("images", f"{args.count} per ingest, cycled from {files} files; "
                                    f"scratch collection {name} (dropped)")):
        print(f"{label:<10} {value}")
    print()
    print(f"{'phase':<17} {'clients':>7} {'count':>6} {'seconds':>8} {'rate':>13} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'of ceiling':>10}")
    for key, p in phases.items():
        share = _of_ceiling(p, after)
        p50, p99 = (_ms(p.percentile(q)) for q in (50, 99))
        print(f"{LABELS[key]:<17} {p.clients:>7} {p.count:>6} {p.seconds:>8.2f} "
              f"{p.per_second:>7.1f} {UNITS[p.tower]:<5} {p50 or '':>8} {p99 or '':>8} "
              f"{'-' if share is None else f'{share:.0%}':>10}")
    print()
    for tower in dict.fromkeys(("image", "text", *after.towers)):
        tuning = after.towers.get(tower)
        if tuning is None:
            print(f"{tower} tower: {NOT_REPORTED}")
        else:
            print(f"{tower} tower: ceiling {tuning.inputs_per_second:.1f} "
                  f"{UNITS.get(tower, 'inputs/s')} at batch {tuning.batch_size}"
                  + (f" ({tuning.reason})" if tuning.reason else ""))


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
