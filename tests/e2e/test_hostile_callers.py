"""No caller can stall the server (issue 18's targets): bodies checked on their head, replies
bounded before they are built, heavy calls in their own budget that stop when abandoned, and
the HTTP door closed to DNS rebinding."""

from __future__ import annotations

import io
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from clipsearch import Client
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc
from conftest import ServerProcess

DIM = 64
TOKEN = "hostile-callers-admin-token-0123456789"
RPC = "/clipsearch.v1.ClipSearchService/"


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def _noise_jpeg(seed: int, side: int = 1024) -> bytes:
    """A photo-sized image of noise: its 1024 px WebP thumbnail is about a megabyte."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def _http(port: int, head: str, body: bytes = b"", timeout: float = 10.0
          ) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 exchange on a fresh connection: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + body)
        return _read_reply(sock)


def _read_reply(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a reply head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    status = int(lines[0].split()[1])
    if headers.get("transfer-encoding") == "chunked":
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body = b""
        while rest and not rest.startswith(b"0\r\n"):
            size, _, rest = rest.partition(b"\r\n")
            body, rest = body + rest[:int(size, 16)], rest[int(size, 16) + 2:]
        return status, headers, body
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest


def _post_head(port: int, method: str, length: int, extra: str = "",
               kind: str = "application/json") -> str:
    return (f"POST {RPC}{method} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: {kind}\r\nContent-Length: {length}\r\n{extra}\r\n")


def _post_json(port: int, method: str, message: dict, extra: str = "",
               host: str | None = None) -> tuple[int, dict]:
    body = json.dumps(message).encode()
    head = _post_head(port, method, len(body), extra)
    if host is not None:
        head = head.replace(f"Host: 127.0.0.1:{port}", f"Host: {host}")
    status, headers, reply = _http(port, head, body)
    if "json" not in headers.get("content-type", ""):
        return status, {"text": reply.decode()}
    return status, json.loads(reply) if reply else {}


def _timed_get_page(port: int) -> float:
    start = time.monotonic()
    status, _, _ = _http(port, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")
    assert status == 200
    return time.monotonic() - start


def _timed_search(address: str, token: str | None = None) -> float:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ClipSearchServiceStub(channel)
        request = pb.SearchRequest(collection="small", k=3, vector=pb.Vector(
            data=_vectors(1, 9)[0].astype("<f4").tobytes(), dim=DIM))
        start = time.monotonic()
        stub.Search(request, timeout=10, metadata=metadata)
        return time.monotonic() - start


@pytest.fixture(scope="module")
def open_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ServerProcess]:
    """No tokens (the default): the Host and Origin checks are on."""
    folder = tmp_path_factory.mktemp("hostile-open")
    server = ServerProcess(tiny_checkpoint, folder / "data").start()
    with Client(server.address) as c:
        c.upsert("small", ids=[f"s{i}" for i in range(20)], vectors=_vectors(20))
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def token_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("hostile-token")
    server = ServerProcess(tiny_checkpoint, folder / "data",
                           env={"CLIPSEARCH_AUTH_TOKENS": TOKEN}).start()
    with Client(server.address, token=TOKEN) as c:
        c.upsert("small", ids=[f"s{i}" for i in range(20)], vectors=_vectors(20))
    yield server
    assert server.stop() == 0, server.log()


# --- 1. bodies are checked on their head ------------------------------------------------------
def _flood(port: int, head: str, size: int) -> tuple[float, int]:
    """Send a head declaring `size` bytes and then the body; (seconds to the reply, status)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        stop = threading.Event()

        def pour() -> None:  # the body keeps coming while we wait for the answer
            chunk = b'"x",' * (1 << 18)
            sent = 0
            try:
                while sent < size and not stop.is_set():
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass

        pourer = threading.Thread(target=pour, daemon=True)
        pourer.start()
        try:
            status, _, _ = _read_reply(sock)
        finally:
            stop.set()
        return time.monotonic() - start, status


@pytest.mark.parametrize("with_token", [True, False])
def test_json_floods_are_refused_on_their_head_while_others_are_served(
        open_server: ServerProcess, token_server: ServerProcess, with_token: bool) -> None:
    server = token_server if with_token else open_server
    size = 48 << 20
    head = _post_head(server.http_port, "EmbedTexts", size)
    with ThreadPoolExecutor(8) as pool:
        floods = [pool.submit(_flood, server.http_port, head, size) for _ in range(6)]
        time.sleep(0.3)
        page = pool.submit(_timed_get_page, server.http_port).result(timeout=5)
        search = pool.submit(_timed_search, server.address,
                             TOKEN if with_token else None).result(timeout=5)
        results = [f.result(timeout=30) for f in floods]
    assert page < 1.0 and search < 1.0, (page, search)
    for seconds, status in results:
        assert seconds < 2.0
        assert status == (401 if with_token else 429)  # unauthenticated / resource_exhausted


def test_a_json_body_over_its_cap_without_a_length_is_refused(open_server: ServerProcess
                                                              ) -> None:
    port = open_server.http_port
    head = (f"POST {RPC}EmbedTexts HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head.encode())
        chunk = b'"x",' * (1 << 18)  # 1 MiB
        try:
            for _ in range(12):
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except OSError:
            pass
        status, _, body = _read_reply(sock)
    assert status == 429
    assert b"max-json-bytes" in body


def test_a_large_json_body_is_parsed_off_the_event_loop(token_server: ServerProcess) -> None:
    """An authenticated 7 MiB JSON body of short strings takes seconds to parse: meanwhile the
    page answers at once."""
    port = token_server.http_port
    body = json.dumps({"texts": ["x"] * (7 << 18)}, separators=(",", ":")).encode()
    head = _post_head(port, "EmbedTexts", len(body), f"Authorization: Bearer {TOKEN}\r\n")
    with ThreadPoolExecutor(2) as pool:
        call = pool.submit(_http, port, head, body, 60)
        time.sleep(0.5)
        page = [_timed_get_page(port) for _ in range(5)]
        status, _, reply = call.result(timeout=60)
    assert max(page) < 1.0, page
    assert status == 400 and b"over the limit" in reply  # parsed, then refused by count


def test_a_call_without_content_type_is_told_what_to_send(open_server: ServerProcess) -> None:
    port = open_server.http_port
    body = b'{"name": "small"}'
    head = (f"POST {RPC}GetCollection HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    status, _, reply = _http(port, head, body)
    assert status == 415
    assert "application/json" in json.loads(reply)["message"]


# --- 2. replies are bounded before they are built -----------------------------------------------
@pytest.fixture(scope="module")
def big_thumbnails(open_server: ServerProcess) -> int:
    """A collection of 6 items whose 1024 px thumbnails are about a megabyte each."""
    with grpc.insecure_channel(open_server.address) as channel:
        stub = pb_grpc.ClipSearchServiceStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(name="thumbs", thumbnail_size=1024))
        stub.UpsertItems(pb.UpsertItemsRequest(collection="thumbs", items=[
            pb.Item(id=f"t{i}", image=_noise_jpeg(i)) for i in range(6)]), timeout=120)
        reply = stub.GetItems(pb.GetItemsRequest(collection="thumbs", ids=["t0"],
                                                 include_thumbnails=True))
    return len(reply.items[0].thumbnail)


def test_repeated_ids_are_answered_once_without_growing_memory(
        open_server: ServerProcess, big_thumbnails: int) -> None:
    assert big_thumbnails > 300_000
    pid = open_server.proc.pid
    before = _rss_mib(pid)
    request = pb.GetItemsRequest(collection="thumbs", ids=["t0"] * 4092 + ["nope"] * 4,
                                 include_thumbnails=True)
    with grpc.insecure_channel(open_server.address) as channel:
        reply = pb_grpc.ClipSearchServiceStub(channel).GetItems(request, timeout=60)
    assert [item.id for item in reply.items] == ["t0"]
    assert list(reply.missing_ids) == ["nope"]
    status, body = _post_json(open_server.http_port, "GetItems", {
        "collection": "thumbs", "ids": ["t0"] * 4096, "includeThumbnails": True})
    assert status == 200 and len(body["items"]) == 1
    assert _rss_mib(pid) - before < 100


@pytest.fixture(scope="module")
def small_reply_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory,
                       open_server: ServerProcess, big_thumbnails: int
                       ) -> Iterator[tuple[ServerProcess, int]]:
    """A server whose reply limit holds about two of the big thumbnails."""
    folder = tmp_path_factory.mktemp("small-replies")
    limit = int(2.5 * big_thumbnails)
    server = ServerProcess(tiny_checkpoint, folder / "data", "--max-message-bytes",
                           str(limit)).start()
    with grpc.insecure_channel(open_server.address) as source, \
            grpc.insecure_channel(server.address) as target:
        items = pb_grpc.ClipSearchServiceStub(source).GetItems(pb.GetItemsRequest(
            collection="thumbs", ids=[f"t{i}" for i in range(6)], include_vectors=True))
        stub = pb_grpc.ClipSearchServiceStub(target)
        stub.CreateCollection(pb.CreateCollectionRequest(name="thumbs", thumbnail_size=1024))
        for i in range(6):  # one at a time: each request stays under the small limit
            stub.UpsertItems(pb.UpsertItemsRequest(collection="thumbs", items=[
                pb.Item(id=items.items[i].id, image=_noise_jpeg(i))]), timeout=120)
    yield server, limit
    assert server.stop() == 0, server.log()


def test_replies_past_the_limit_are_refused_naming_it(small_reply_server) -> None:
    server, limit = small_reply_server
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClipSearchServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetItems(pb.GetItemsRequest(collection="thumbs", ids=[f"t{i}" for i in range(6)],
                                             include_thumbnails=True))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(limit) in err.value.details() and "max-message-bytes" in err.value.details()
        query = pb.SearchRequest(collection="thumbs", k=6, include_thumbnails=True,
                                 vector=pb.Vector(data=_vectors(1)[0].tobytes(), dim=DIM))
        with pytest.raises(grpc.RpcError) as err:
            stub.Search(query)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        query.include_thumbnails = False
        assert len(stub.Search(query).hits) == 6  # without thumbnails it fits
    status, body = _post_json(server.http_port, "GetItems", {
        "collection": "thumbs", "ids": [f"t{i}" for i in range(6)], "includeThumbnails": True})
    assert status == 429 and str(limit) in body["message"]


def test_listings_past_the_limit_end_their_page_early(small_reply_server) -> None:
    server, _ = small_reply_server
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClipSearchServiceStub(channel)
        seen, token, pages = [], "", 0
        while True:
            page = stub.ListItems(pb.ListItemsRequest(collection="thumbs", page_size=100,
                                                      page_token=token,
                                                      include_thumbnails=True))
            assert 1 <= len(page.items) <= 2
            assert all(item.thumbnail for item in page.items)
            seen += [item.id for item in page.items]
            pages += 1
            token = page.next_page_token
            if not token:
                break
    assert seen == [f"t{i}" for i in range(6)] and pages >= 3


# --- 3. heavy calls: their own budget, and they stop when abandoned -------------------------
@pytest.fixture(scope="module")
def heavy_collection(open_server: ServerProcess) -> str:
    """16,000 vectors: FindDuplicates at ef 4096 on it (65.5M, just under the default
    --max-duplicates-work) runs well past the 7 s the tests give it on a fast CPU too (on a
    Zen 4, 5,000 vectors finished in time)."""
    with Client(open_server.address) as c:
        c.upsert("heavy", ids=[f"v{i}" for i in range(16_000)], vectors=_vectors(16_000, 5))
    return "heavy"


def _search_latencies(address: str, seconds: float) -> list[float]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ClipSearchServiceStub(channel)
        request = pb.SearchRequest(collection="small", k=10, vector=pb.Vector(
            data=_vectors(1, 3)[0].tobytes(), dim=DIM))
        stub.Search(request)
        out = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.monotonic()
            stub.Search(request, timeout=30)
            out.append(time.monotonic() - start)
            time.sleep(0.005)
    return out


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def test_abandoned_heavy_calls_stop_and_never_slow_search(open_server: ServerProcess,
                                                          heavy_collection: str) -> None:
    idle = _p99(_search_latencies(open_server.address, 6))
    abandoned_at = []
    with grpc.insecure_channel(open_server.address) as channel:
        stub = pb_grpc.ClipSearchServiceStub(channel)
        calls = []
        for _ in range(8):
            calls.append(stub.FindDuplicates.future(pb.FindDuplicatesRequest(
                collection=heavy_collection, neighbors=100, ef=4096), timeout=7))
            calls.append(stub.Cluster.future(pb.ClusterRequest(
                collection=heavy_collection, n_clusters=1000), timeout=7))
        busy = _search_latencies(open_server.address, 6)
        codes = []
        for call in calls:
            try:
                call.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
            abandoned_at.append(time.monotonic())
        # Admitted calls ran until their deadline (or done); the rest were refused at once.
        assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK,
                              grpc.StatusCode.RESOURCE_EXHAUSTED}
        last = max(abandoned_at)
        # The heavy pool is free again within 2 s: two new calls (the per-caller budget) run.
        while True:
            try:
                probes = [stub.Cluster.future(pb.ClusterRequest(
                    collection="small", n_clusters=n), timeout=10) for n in (2, 3)]
                for probe in probes:  # at once: both slots of this caller are free
                    probe.result()
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                assert time.monotonic() - last < 2.0, "heavy pool still busy"
                time.sleep(0.05)
    assert _p99(busy) < 2 * max(idle, 0.002), (idle, _p99(busy))


def test_costs_that_cannot_finish_are_refused_up_front(tiny_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    server = ServerProcess(tiny_checkpoint, tmp_path / "data", "--max-duplicates-work",
                           "100000", "--max-cluster-work", "10000").start()
    try:
        with Client(server.address) as c:
            c.upsert("mid", ids=[f"m{i}" for i in range(200)], vectors=_vectors(200))
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ClipSearchServiceStub(channel)
            for call, flag in ((lambda: stub.FindDuplicates(pb.FindDuplicatesRequest(
                    collection="mid", ef=1000)), "--max-duplicates-work"),
                    (lambda: stub.Cluster(pb.ClusterRequest(collection="mid", n_clusters=100)),
                     "--max-cluster-work")):
                start = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert flag in err.value.details() and time.monotonic() - start < 1
            assert stub.Cluster(pb.ClusterRequest(collection="mid", n_clusters=10)).clusters
    finally:
        assert server.stop() == 0, server.log()


def test_an_http_client_that_goes_away_frees_its_heavy_slot(open_server: ServerProcess,
                                                           heavy_collection: str) -> None:
    port = open_server.http_port
    # ef 4095: not a result another test may have left in the duplicates cache
    body = json.dumps({"collection": heavy_collection, "neighbors": 100, "ef": 4095}).encode()
    head = _post_head(port, "FindDuplicates", len(body))
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    for sock in socks:
        sock.sendall(head.encode() + body)
    time.sleep(1.0)
    probe = {"collection": "small", "nClusters": 2}  # Cluster: never answered from a cache
    status, reply = _post_json(port, "Cluster", probe)
    assert status == 429 and "max-heavy-calls-per-caller" in reply["message"]
    for sock in socks:
        sock.close()
    gone = time.monotonic()
    while True:
        status, reply = _post_json(port, "Cluster", probe)
        if status == 200:
            break
        assert status == 429 and time.monotonic() - gone < 3.0, reply
        time.sleep(0.05)


# --- 4. DNS rebinding ------------------------------------------------------------------------
def test_a_rebound_host_is_refused_and_changes_nothing(open_server: ServerProcess) -> None:
    port = open_server.http_port
    status, _ = _post_json(port, "DropCollection", {"name": "small"},
                           host="attacker.example")
    assert status == 403
    status, _ = _post_json(port, "DropCollection", {"name": "small"},
                           extra="Origin: http://attacker.example\r\n")
    assert status == 403
    page = _http(port, "GET / HTTP/1.1\r\nHost: attacker.example:80\r\n\r\n")
    assert page[0] == 403 and b"allowed-hosts" in page[2]
    with Client(open_server.address) as c:
        assert c.count("small") == 20
    # the page's own calls: same origin, and localhost by name
    status, _ = _post_json(port, "CountItems", {"collection": "small"},
                           extra=f"Origin: http://127.0.0.1:{port}\r\n")
    assert status == 200
    status, _ = _post_json(port, "CountItems", {"collection": "small"},
                           host=f"localhost:{port}")
    assert status == 200


def test_allowed_hosts_are_answered(tiny_checkpoint: Path, tmp_path: Path) -> None:
    server = ServerProcess(tiny_checkpoint, tmp_path / "data", "--allowed-hosts",
                           "photos.internal").start()
    try:
        port = server.http_port
        status, _ = _post_json(port, "ListCollections", {}, host="photos.internal")
        assert status == 200
        status, _ = _post_json(port, "ListCollections", {}, host="photos.internal",
                               extra="Origin: https://photos.internal\r\n")
        assert status == 200
        status, _ = _post_json(port, "ListCollections", {}, host="other.internal")
        assert status == 403
    finally:
        assert server.stop() == 0, server.log()
