"""Slow and idle clients at both doors: read timeouts and connection limits (http_limits.py).

A real server with short limits: request heads and bodies trickled a byte at a time are cut off
within their timeout, connections beyond the limit are refused at once without keeping a
descriptor, and ordinary requests (the page, a Connect call, keep-alive reuse) are untouched.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipsearch_server.config import Settings, parse_settings, validate
from clipsearch_server.doors.http_limits import (
    HttpLimits,
    grpc_connection_options,
    guarded_protocol,
)
from conftest import ServerProcess

HEAD_S = 2.0  # --http-header-timeout-s
BODY_S = 2.0  # --http-body-timeout-s
MAX_HTTP = 4  # --http-max-connections
IDLE_S = 1.0  # --grpc-max-connection-idle-s
HANDSHAKE_S = 2.0  # --grpc-handshake-timeout-s
MAX_GRPC = 4  # --grpc-max-connections
MARGIN_S = 1.5  # scheduling slack on a busy test machine
LIST = "/clipsearch.v1.ClipSearchService/ListCollections"


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tiny_checkpoint, tmp_path_factory.mktemp("slow") / "data",
        "--http-header-timeout-s", str(HEAD_S), "--http-body-timeout-s", str(BODY_S),
        "--http-max-connections", str(MAX_HTTP),
        "--grpc-max-connection-idle-s", str(IDLE_S),
        "--grpc-handshake-timeout-s", str(HANDSHAKE_S),
        "--grpc-max-connections", str(MAX_GRPC)).start()
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        assert proc.stop() == 0, proc.log()


def _read_to_end(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def trickle(port: int, prefix: bytes, slow: bytes, gap_s: float = 0.5,
            give_up_s: float = 20.0) -> tuple[float, bytes]:
    """Send `prefix` at once, then `slow` one byte per `gap_s`, until the server answers or
    closes; returns (seconds from connecting until then, what the server sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=give_up_s) as sock:
        start = time.monotonic()
        if prefix:
            sock.sendall(prefix)
        for byte in slow:
            try:
                sock.send(bytes([byte]))
            except OSError:  # closed (reset) while we were sending
                return time.monotonic() - start, b""
            readable, _, _ = select.select([sock], [], [], gap_s)
            if readable:
                return time.monotonic() - start, _read_to_end(sock)
            if time.monotonic() - start > give_up_s:
                break
        return time.monotonic() - start, b""


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes this (silent) connection within `seconds` (whatever it
    sends first: an answer, HTTP/2 settings, a GOAWAY)."""
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(4096):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def head(server: ServerProcess, method: str = "GET", path: str = "/", length: int = 0) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{server.http_port}",
             "User-Agent: slow-client-test"]
    if length:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_trickled_request_head_is_cut_off(server: ServerProcess) -> None:
    request = head(server)
    assert len(request) * 0.5 > 3 * HEAD_S  # it would take far longer than the timeout
    elapsed, answer = trickle(server.http_port, b"", request)
    assert HEAD_S - 0.1 <= elapsed <= HEAD_S + MARGIN_S, elapsed
    assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower()


def test_a_silent_connection_is_closed_after_the_head_timeout(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        start = time.monotonic()
        assert closed_within(sock, HEAD_S + MARGIN_S)
        assert time.monotonic() - start >= HEAD_S - 0.1


def test_a_trickled_body_is_cut_off(server: ServerProcess) -> None:
    elapsed, answer = trickle(server.http_port, head(server, "POST", LIST, 100), b"{" * 100)
    assert BODY_S - 0.1 <= elapsed <= BODY_S + MARGIN_S, elapsed
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_ordinary_requests_and_keep_alive_are_untouched(server: ServerProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    conn.request("GET", "/")
    reply = conn.getresponse()
    assert reply.status == 200 and b"<html" in reply.read().lower()
    sock = conn.sock
    # Idle gaps shorter than the head timeout, adding up to well past it: the head's clock
    # restarts with each response.
    for _ in range(3):
        time.sleep(HEAD_S * 0.6)
        conn.request("POST", LIST, body=b"{}", headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        body = reply.read()
        assert reply.status == 200, body
        assert isinstance(json.loads(body), dict)
    assert conn.sock is sock  # one connection all along
    conn.close()


def test_connections_beyond_the_limit_are_refused_at_once(server: ServerProcess) -> None:
    fds = Path(f"/proc/{server.proc.pid}/fd") if server.proc else None
    before = len(os.listdir(fds)) if fds and fds.is_dir() else None
    held = [socket.create_connection(("127.0.0.1", server.http_port))
            for _ in range(MAX_HTTP)]
    try:
        time.sleep(0.2)  # all accepted
        refused = []
        start = time.monotonic()
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as extra:
                refused.append(_read_to_end(extra))
        assert time.monotonic() - start < HEAD_S  # answered at once, not at a timeout
        assert all(r.startswith(b"HTTP/1.1 503 ") for r in refused), refused[:2]
        if before is not None:
            # the refused ones hold no descriptor: only the held connections are open
            assert len(os.listdir(fds)) <= before + MAX_HTTP + 2
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    conn.request("GET", "/")
    assert conn.getresponse().status == 200
    conn.close()


def test_many_slow_clients_cannot_keep_the_door(server: ServerProcess) -> None:
    """The finding: 40 connections trickling headers stayed open for a minute."""
    results: list[tuple[float, bytes]] = []

    def one() -> None:
        results.append(trickle(server.http_port, b"", head(server)))

    threads = [threading.Thread(target=one) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 40
    assert max(elapsed for elapsed, _ in results) <= HEAD_S + MARGIN_S + 1
    codes = [answer[9:12] for _, answer in results]
    # a refused client that had sent a byte may see a reset instead of the 503 (b"")
    assert set(codes) <= {b"408", b"503", b""}, codes
    assert codes.count(b"408") <= MAX_HTTP and codes.count(b"503") >= 1
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    conn.request("GET", "/")
    assert conn.getresponse().status == 200
    conn.close()


def test_grpc_idle_connections_are_closed(server: ServerProcess) -> None:
    states: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(server.address,
                               options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        channel.subscribe(states.append, try_to_connect=False)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        ready_at = time.monotonic()
        while time.monotonic() - ready_at < IDLE_S + 10:
            if states and states[-1] != grpc.ChannelConnectivity.READY:
                break
            time.sleep(0.1)
        assert states[-1] == grpc.ChannelConnectivity.IDLE, states  # the server's GOAWAY
        # and the next call reconnects as if nothing happened
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_grpc_handshake_timeout_and_connection_limit(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"PRI * HTTP/2.0\r\n")  # half the HTTP/2 preface, then nothing
        start = time.monotonic()
        assert closed_within(slow, HANDSHAKE_S + MARGIN_S)
        assert time.monotonic() - start <= HANDSHAKE_S + MARGIN_S
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_GRPC)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", server.port)) as extra:
            assert closed_within(extra, 0.5)
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_settings_are_validated_and_mapped() -> None:
    assert validate(Settings()) is None
    assert "--http-header-timeout-s" in (validate(Settings(http_header_timeout_s=0)) or "")
    assert "--http-body-timeout-s" in (validate(Settings(http_body_timeout_s=-1)) or "")
    assert "--grpc-max-connection-idle-s" in (
        validate(Settings(grpc_max_connection_idle_s=-1)) or "")
    assert validate(Settings(http_max_connections=-1)) is not None
    assert validate(Settings(grpc_keepalive_time_s=10**9)) is not None
    with pytest.raises(SystemExit):
        parse_settings(["--random-weights", "--http-body-timeout-s", "0"])
    options = dict(grpc_connection_options(Settings()))
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.max_connection_idle_ms"] == 300_000
    assert options["grpc.server_handshake_timeout_ms"] == 10_000
    assert options["grpc.max_allowed_incoming_connections"] == 512
    assert "grpc.max_connection_age_ms" not in options  # unlimited by default
    aged = dict(grpc_connection_options(Settings(grpc_max_connection_age_s=1800,
                                                 grpc_max_connections=0)))
    assert aged["grpc.max_connection_age_ms"] == 1_800_000
    assert aged["grpc.max_connection_age_grace_ms"] == 30_000
    assert "grpc.max_allowed_incoming_connections" not in aged


@pytest.mark.parametrize("expect_continue", [False, True])
def test_time_the_server_is_not_reading_does_not_count(expect_continue: bool) -> None:
    """A body sent at once to an application slow to read it (uvicorn stops reading past
    64 KiB), or held back until the server answers "Expect: 100-continue" (it does when the
    application first reads), is not late: the body timeout counts only time spent reading."""
    import uvicorn

    async def slow_reader(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        await asyncio.sleep(1.5)  # longer than the body timeout
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = str(size).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def run() -> bytes:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(slow_reader, lifespan="off", log_config=None, ws="none",
                                http=guarded_protocol(HttpLimits(1.0, 1.0, 8)))
        uv = uvicorn.Server(config)
        task = asyncio.create_task(uv.serve(sockets=[sock]))
        while not uv.started:
            await asyncio.sleep(0.01)
        size = 4 << 20
        reader, writer = await asyncio.open_connection(*sock.getsockname())
        expect = b"Expect: 100-continue\r\n" if expect_continue else b""
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n"
                     % (expect, size))
        if expect_continue:
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"x" * size)
        await writer.drain()
        answer = b""
        while not answer.endswith(b"\r\n\r\n" + str(size).encode()):
            chunk = await asyncio.wait_for(reader.read(4096), 30)
            if not chunk:
                break
            answer += chunk
        writer.close()
        uv.should_exit = True
        await task
        sock.close()
        return answer

    answer = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(str(4 << 20).encode())
