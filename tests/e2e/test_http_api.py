"""The API over plain HTTP: Connect JSON and binary, gRPC-Web, errors, auth, limits, thumbnails."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import struct
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from test_security import Pki, pki  # noqa: F401 - its certificate fixture

from clipsearch.v1 import clipsearch_pb2 as pb
from conftest import ServerProcess, coco_images

SERVICE = "/clipsearch.v1.ClipSearchService/"
TOKEN = "http-test-token-0123456789abcdef"


def call(server: ServerProcess, method: str, body: dict | bytes, *,
         headers: dict[str, str] | None = None) -> tuple[int, dict, dict[str, str]]:
    """POST one Connect JSON call; returns (HTTP status, JSON body, response headers)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        server.http_url + SERVICE + method, data=data, method="POST",
        headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read()), dict(reply.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def get(server: ServerProcess, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(server.http_url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read(), dict(reply.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def photos_json(n: int) -> list[dict]:
    return [{"id": f"sub/{p.name}", "image": base64.b64encode(p.read_bytes()).decode(),
             "metadata": {"path": f"sub/{p.name}", "rank": i}}
            for i, p in enumerate(coco_images(n))]


def test_json_in_json_out(server: ServerProcess) -> None:
    status, body, headers = call(server, "UpsertItems",
                                 {"collection": "http-photos", "items": photos_json(4)})
    assert (status, body) == (200, {"upserted": 4})
    assert headers.get("x-request-id")
    status, body, _ = call(server, "Search", {"collection": "http-photos", "text": "a dog",
                                              "k": 3})
    assert status == 200 and len(body["hits"]) == 3
    assert {"id", "score", "metadata"} <= set(body["hits"][0])
    # the same answer as gRPC gives for the same query
    import grpc as grpc_mod

    from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc
    with grpc_mod.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClipSearchServiceStub(channel)
        hits = stub.Search(pb.SearchRequest(collection="http-photos", text="a dog", k=3)).hits
    assert [h.id for h in hits] == [h["id"] for h in body["hits"]]
    status, body, _ = call(server, "Search", {"collection": "http-photos", "id": "sub/" +
                                              coco_images(1)[0].name, "k": 2,
                                              "includeThumbnails": True,
                                              "filter": {"field": {"key": "rank",
                                                                   "range": {"lte": 1}}}})
    assert status == 200 and len(body["hits"]) == 2
    assert all(base64.b64decode(h["thumbnail"])[:4] == b"RIFF" for h in body["hits"])
    status, body, headers = call(server, "ListCollections", {},
                                 headers={"X-Request-Id": "page-call-42"})
    assert headers["x-request-id"] == "page-call-42"  # the caller's id, as over gRPC
    assert {"name": "http-photos", "count": "4"}.items() <= next(
        c for c in body["collections"] if c["name"] == "http-photos").items()


def test_errors_carry_the_grpc_code_message_and_field(server: ServerProcess) -> None:
    status, body, _ = call(server, "Search", {"collection": "http-photos", "text": "x",
                                                    "k": 0})
    assert status == 400 and body["code"] == "invalid_argument"
    assert body["message"] == "k must be 1..1000, not 0"
    detail = body["details"][0]
    assert detail["type"] == "google.rpc.BadRequest"
    value = base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4))
    violation = error_details_pb2.BadRequest.FromString(value).field_violations[0]
    assert violation.field == "k"
    with grpc.insecure_channel(server.address) as channel:
        from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.ClipSearchServiceStub(channel).Search(
                pb.SearchRequest(collection="http-photos", text="x", k=0))
    assert err.value.details() == body["message"]
    status, body, _ = call(server, "GetCollection", {"name": "no-such"})
    assert (status, body["code"]) == (404, "not_found")
    status, body, _ = call(server, "GetCollection", {"name": "../etc"})
    assert (status, body["code"]) == (400, "invalid_argument")
    status, body, _ = call(server, "Search", b'{"collection": ')
    assert (status, body["code"]) == (400, "invalid_argument")
    status, body, _ = call(server, "Search", {"collection": "x", "k": "many"})
    assert (status, body["code"]) == (400, "invalid_argument")
    status, _, _ = get(server, SERVICE + "NoSuchMethod")
    assert status == 404


def test_connect_binary_and_grpc_web(server: ServerProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    create = pb.CreateCollectionRequest(name="http-binary", thumbnail_size=64)
    conn.request("POST", SERVICE + "CreateCollection", body=create.SerializeToString(),
                 headers={"Content-Type": "application/proto"})
    reply = conn.getresponse()
    assert reply.status == 200
    created = pb.CreateCollectionResponse.FromString(reply.read()).collection
    assert (created.name, created.thumbnail_size) == ("http-binary", 64)
    request = pb.GetCollectionRequest(name="http-binary").SerializeToString()
    # gRPC-Web: a length-prefixed frame in, a message frame and a trailer frame out
    conn.request("POST", SERVICE + "GetCollection",
                 body=b"\x00" + struct.pack(">I", len(request)) + request,
                 headers={"Content-Type": "application/grpc-web+proto", "X-Grpc-Web": "1"})
    reply = conn.getresponse()
    data = reply.read()
    assert reply.status == 200
    flag, size = data[0], struct.unpack(">I", data[1:5])[0]
    assert flag == 0
    assert pb.GetCollectionResponse.FromString(data[5:5 + size]).collection.name == "http-binary"
    assert b"grpc-status:0" in data[5 + size:].replace(b" ", b"")
    conn.close()


def test_thumbnail_endpoint(server: ServerProcess) -> None:
    name = "sub/" + coco_images(1)[0].name
    path = "/thumbnail?" + urllib.parse.urlencode({"collection": "http-photos", "id": name})
    status, body, headers = get(server, path)
    assert status == 200 and body[:4] == b"RIFF" and body[8:12] == b"WEBP"
    assert headers["content-type"] == "image/webp"
    assert headers["x-content-type-options"] == "nosniff"
    assert "max-age" in headers["cache-control"]
    status, _, _ = get(server, path, {"If-None-Match": headers["etag"]})
    assert status == 304
    for bad in ("collection=..%2F..%2Fetc&id=passwd", "collection=http-photos&id=..%2Fstore",
                "collection=http-photos&id=", "id=x"):
        status, body, headers = get(server, "/thumbnail?" + bad)
        assert status in (400, 404), bad
        assert headers["content-type"].startswith("text/plain")
    status, _, _ = get(server, "/../../etc/passwd")
    assert status == 404


def test_page_is_served_with_safe_headers(server: ServerProcess) -> None:
    status, body, headers = get(server, "/")
    assert status == 200 and b"<html" in body.lower()
    assert headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"]
    for asset in ("/app.js", "/api.js", "/filters.js", "/style.css"):
        assert get(server, asset)[0] == 200


@pytest.fixture(scope="module")
def secured(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("http-auth") / "data",
                         "--max-message-bytes", str(1 << 20),
                         env={"CLIPSEARCH_AUTH_TOKENS": TOKEN}).start()
    yield proc
    assert proc.stop() == 0, proc.log()


def test_bearer_auth_over_http(secured: ServerProcess) -> None:
    status, body, _ = call(secured, "ListCollections", {})
    assert (status, body["code"]) == (401, "unauthenticated")
    assert body["message"] == "missing 'authorization: Bearer <token>' metadata"
    status, body, _ = call(secured, "ListCollections", {},
                           headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert (status, body["message"]) == (401, "invalid bearer token")
    status, body, _ = call(secured, "ListCollections", {},
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    assert get(secured, "/thumbnail?collection=a&id=b")[0] == 401
    assert get(secured, "/")[0] == 200  # the page itself asks for the token


def test_oversized_body_is_refused_before_it_is_read(secured: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", secured.http_port), timeout=30) as sock:
        sock.sendall(
            f"POST {SERVICE}UpsertItems HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            f"\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {200 << 20}\r\n\r\n".encode())
        sent = 0
        reply = b""
        sock.settimeout(0.05)
        while sent < (200 << 20) and not reply:
            try:
                sock.sendall(b" " * (256 << 10))
                sent += 256 << 10
            except OSError:
                break
            try:
                reply = sock.recv(65536)
            except TimeoutError:
                continue
        sock.settimeout(30)
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert sent < (20 << 20), "the server read far past its limit"
    assert reply.startswith(b"HTTP/1.1 429"), reply[:200]


def test_http_calls_share_the_metrics(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from conftest import free_port

    metrics_port = free_port()
    proc = ServerProcess(tiny_checkpoint, tmp_path / "data", "--metrics-port",
                         str(metrics_port)).start()
    try:
        assert call(proc, "ListCollections", {})[0] == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as reply:
            text = reply.read().decode()
        assert 'clipsearch_requests_total{code="OK",method="ListCollections"} 1.0' in text
    finally:
        assert proc.stop() == 0, proc.log()


def test_http_port_zero_turns_it_off(tiny_checkpoint: Path, tmp_path: Path) -> None:
    proc = ServerProcess(tiny_checkpoint, tmp_path / "data", "--http-port", "0").start()
    try:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proc.http_port), timeout=2).close()
        assert "search page" not in proc.log()
    finally:
        assert proc.stop() == 0, proc.log()


def test_the_server_names_the_page_when_ready(server: ServerProcess) -> None:
    assert f"search page: http://127.0.0.1:{server.http_port}/" in server.log()



def test_http_door_uses_the_grpc_tls_settings(tiny_checkpoint: Path, tmp_path: Path,
                                              pki: Pki) -> None:  # noqa: F811 - the fixture
    import ssl

    creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.client_key.read_bytes(),
                                         pki.client_cert.read_bytes())
    proc = ServerProcess(tiny_checkpoint, tmp_path / "data", "--tls-cert", str(pki.server_cert),
                         "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca),
                         credentials=creds).start()
    try:
        assert f"search page: https://127.0.0.1:{proc.http_port}/" in proc.log()

        def post(context: ssl.SSLContext) -> int:
            conn = http.client.HTTPSConnection("localhost", proc.http_port, context=context,
                                               timeout=10)
            try:
                conn.request("POST", SERVICE + "ListCollections", body=b"{}",
                             headers={"Content-Type": "application/json"})
                return conn.getresponse().status
            finally:
                conn.close()

        trusted = ssl.create_default_context(cafile=str(pki.ca))
        with_cert = ssl.create_default_context(cafile=str(pki.ca))
        with_cert.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        assert post(with_cert) == 200
        with pytest.raises((ssl.SSLError, ConnectionError)):
            post(trusted)  # mutual TLS: no client certificate, no call
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn = http.client.HTTPConnection("127.0.0.1", proc.http_port, timeout=10)
            conn.request("GET", "/")
            conn.getresponse()  # plaintext to a TLS port
    finally:
        assert proc.stop() == 0, proc.log()
