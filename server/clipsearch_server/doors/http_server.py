"""The HTTP door: the API over Connect / gRPC-Web / JSON, thumbnails, and the search page.

One ASGI application under uvicorn, in the gRPC server's process and event loop:
- `/clipsearch.v1.ClipSearchService/<Method>`: connectrpc's generated application over the
  shared servicer (connect_bridge.py), so both doors share validation, auth, metrics and ids;
- `GET /thumbnail?collection=C&id=I`: an item's WebP thumbnail, read through the same GetItems
  call (same auth and validation; nothing is read from the file system), with an ETag;
- `/` and its scripts and style sheet: the page, from a fixed list of files shipped in `web/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import ssl
from collections.abc import Iterator
from importlib import resources
from urllib.parse import parse_qs

import uvicorn
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo
from connectrpc.request import Headers, RequestContext

from clipsearch.v1 import clipsearch_pb2 as pb

from ..settings import AnySettings
from ..thumbnails import CONTENT_TYPE as THUMBNAIL_TYPE
from .auth import TokenTable
from .connect_bridge import CLIENT_GONE, SERVICE, ConnectApp
from .http_gate import (
    HTTP_STATUS,
    HostCheck,
    Receive,
    RpcHeadCheck,
    Scope,
    Send,
    send_connect_error,
    send_text,
)
from .http_limits import HttpLimits, guarded_protocol

log = logging.getLogger(__name__)

RPC_PREFIX = f"/{SERVICE.full_name}/"
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/api.js": ("api.js", "text/javascript; charset=utf-8"),
              "/filters.js": ("filters.js", "text/javascript; charset=utf-8"),
              "/style.css": ("style.css", "text/css; charset=utf-8")}
# The page talks only to its own origin and never runs inline script.
PAGE_SECURITY = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
     b"connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_GET_ITEMS = MethodInfo(name="GetItems", service_name=SERVICE.full_name,
                        input=pb.GetItemsRequest, output=pb.GetItemsResponse,
                        idempotency_level=IdempotencyLevel.NO_SIDE_EFFECTS)


class HttpApp:
    """Routes a request to the Connect application, the thumbnail endpoint or the page, after
    the checks a request passes on its head alone (http_gate.py)."""

    def __init__(self, servicer: object, interceptors: list, settings: AnySettings,
                 tokens: TokenTable) -> None:
        self.connect = ConnectApp(servicer, interceptors,
                                  max_in_flight=settings.max_concurrent_rpcs,
                                  read_max_bytes=settings.max_message_bytes)
        self._page = {path: _page_file(name, kind) for path, (name, kind) in PAGE_FILES.items()}
        # With tokens a rebound page has no token to send; without, Host and Origin decide.
        self._hosts = None if tokens else HostCheck(settings.http_host, settings.allowed_hosts)
        self._rpc_head = RpcHeadCheck(tokens, settings.max_json_bytes, settings.max_message_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        if self._hosts is not None and (why := self._hosts.refusal(scope)) is not None:
            await send_text(send, 403, why)
            return
        path = scope["path"]
        if path.startswith(RPC_PREFIX):
            await self._rpc(scope, receive, send)
        elif path == "/thumbnail":
            await self._thumbnail(scope, send)
        elif path in self._page:
            body, kind, etag = self._page[path]
            await _send_cached(scope, send, body, kind, etag, b"no-cache", PAGE_SECURITY)
        else:
            await send_text(send, 404, "not found")

    async def _rpc(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An API call: refused on its head, or handed to connectrpc with its body counted and,
        once the body is in, a watch for the client going away (which cancels the call)."""
        refusal = self._rpc_head.refusal(scope)
        if refusal is not None:
            await send_connect_error(send, refusal.code, refusal.message, refusal.http_status)
            return
        gone = asyncio.Event()
        watch: list[asyncio.Task] = []

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        def body_done() -> None:
            watch.append(asyncio.create_task(watch_disconnect()))

        token = CLIENT_GONE.set(gone)
        try:
            await self.connect(scope, self._rpc_head.counted(  # type: ignore[arg-type]
                receive, self._rpc_head.cap(scope), body_done), send)
        finally:
            CLIENT_GONE.reset(token)
            for task in watch:
                task.cancel()

    async def _thumbnail(self, scope: Scope, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await send_text(send, 405, "use GET")
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        collection = query.get("collection", [""])[0]
        item_id = query.get("id", [""])[0]
        headers = Headers({k.decode("latin-1"): v.decode("latin-1")
                           for k, v in scope.get("headers", ())})
        ctx = RequestContext(method=_GET_ITEMS, http_method="GET", request_headers=headers)
        request = pb.GetItemsRequest(collection=collection, ids=[item_id],
                                     include_thumbnails=True)
        try:
            reply = await self.connect.bridge.get_items(request, ctx)
        except ConnectError as exc:
            await send_text(send, HTTP_STATUS.get(exc.code.value, 500), exc.message)
            return
        if not reply.items or not reply.items[0].thumbnail:
            await send_text(send, 404, f"no thumbnail for item {item_id!r}")
            return
        body = reply.items[0].thumbnail
        extra = [(k.encode(), v.encode()) for k, v in ctx.response_headers.allitems()]
        # private: with auth on, a shared cache must not hand it to others
        await _send_cached(scope, send, body, THUMBNAIL_TYPE, _etag(body),
                           b"private, max-age=300", [*extra, (b"x-content-type-options",
                                                             b"nosniff")])


def _page_file(name: str, kind: str) -> tuple[bytes, str, bytes]:
    body = resources.files("clipsearch_server.doors.web").joinpath(name).read_bytes()
    return body, kind, _etag(body)


def _etag(body: bytes) -> bytes:
    return b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'


async def _send_cached(scope: Scope, send: Send, body: bytes, kind: str, etag: bytes,
                       cache_control: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    headers = [(b"content-type", kind.encode()), (b"etag", etag),
               (b"cache-control", cache_control), *extra]
    matches = dict(scope.get("headers", ())).get(b"if-none-match", b"")
    if etag in [t.strip() for t in matches.split(b",")] or matches.strip() == b"*":
        await send({"type": "http.response.start", "status": 304, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body",
                "body": b"" if scope["method"] == "HEAD" else body})


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our event loop: the process's signal handling stays ours."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """uvicorn serving HttpApp on a socket we bind ourselves (so a busy port is our error)."""

    def __init__(self, app: HttpApp, settings: AnySettings) -> None:
        self.settings = settings
        self.sock = _bind(settings.http_host, settings.http_port)
        self.port: int = self.sock.getsockname()[1]
        tls = settings.tls_cert is not None
        config = uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=False, server_header=False,
            # httptools with head/body read timeouts and a connection limit (http_limits.py);
            # no websockets: an upgraded connection would leave both behind
            http=guarded_protocol(HttpLimits.from_settings(settings)), ws="none",
            timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
            ssl_certfile=str(settings.tls_cert) if tls else None,
            ssl_keyfile=str(settings.tls_key) if tls else None,
            ssl_ca_certs=str(settings.tls_client_ca) if settings.tls_client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if settings.tls_client_ca else ssl.CERT_NONE,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = self.settings.http_host
        host = "localhost" if host in ("0.0.0.0", "::", "") else host
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.settings.tls_cert is not None else "http"
        return f"{scheme}://{host}:{self.port}/"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what went wrong
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self.sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Replies go out in several writes (headers, body, end): without this, Nagle's algorithm
    # holds the last one for the client's delayed ACK, 40 ms on Linux.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
