"""The gRPC servicer answering Connect, gRPC-Web and JSON calls, through the same interceptors.

connectrpc's generated application (clipsearch_connect.py) decodes a call from any of its
protocols and hands the request message to a method of ours. Every such method runs the one
ClipSearchServicer method that gRPC calls, wrapped by the very interceptors the gRPC server
uses (request ids, metrics, bearer auth), with a small stand-in for grpc's servicer context.
An abort there (a validation error, a refused token) becomes a ConnectError with the same
code, message and google.rpc.BadRequest details. New RPCs in the proto are picked up from
the service descriptor: there is nothing to write per method.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import grpc
from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.compat import google_protobuf_codecs
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication
from google.protobuf import json_format
from google.rpc import status_pb2
from protobuf.wkt import Any as ConnectAny

from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1.clipsearch_connect import ClipSearchServiceASGIApplication

SERVICE = pb.DESCRIPTOR.services_by_name["ClipSearchService"]
# Set by the HTTP door for each API call: set once the client has gone away, so the call stops.
CLIENT_GONE: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar(
    "clipsearch_client_gone", default=None)
# Request bodies at least this large are parsed in a thread, not on the event loop.
OFF_LOOP_DECODE_BYTES = 256 * 1024
STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Headers that are HTTP's business, not the call's metadata.
_NOT_METADATA = frozenset({"host", "content-type", "content-length", "content-encoding",
                           "accept", "accept-encoding", "connection", "user-agent", "origin",
                           "referer", "te", "connect-protocol-version", "connect-timeout-ms",
                           "grpc-timeout", "x-grpc-web", "x-user-agent"})


class _CallDetails(NamedTuple):
    """What grpc's interceptors are shown of a call (grpc.HandlerCallDetails)."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class _Aborted(grpc.aio.AbortError):
    """Raised by the stand-in context's abort(), as grpc.aio raises its own AbortError."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


class BridgeContext:
    """The part of grpc.aio.ServicerContext that the servicer and interceptors use."""

    def __init__(self, ctx: RequestContext, metadata: tuple[tuple[str, str], ...]) -> None:
        self._ctx = ctx
        self._metadata = metadata
        self._code: grpc.StatusCode | None = None

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Sequence[tuple[str, str | bytes]] = ()) -> None:
        self._code = code
        raise _Aborted(code, details, trailing_metadata)

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, str]]) -> None:
        # Sent as response headers: with the Connect protocol a unary call has no trailers,
        # and a request id is most useful where curl -i and the browser show it.
        for key, value in metadata:
            self._ctx.response_headers[key] = value

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        remaining_ms = self._ctx.timeout_ms
        return None if remaining_ms is None else max(0.0, remaining_ms / 1000)

    def cancelled(self) -> bool:
        gone = CLIENT_GONE.get()
        return gone is not None and gone.is_set()

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def peer(self) -> str:
        return self._ctx.client_address or ""


def connect_code(code: grpc.StatusCode) -> Code:
    """The Connect code of a gRPC status code (they share names, but for one spelling)."""
    return Code.CANCELED if code is grpc.StatusCode.CANCELLED else Code[code.name]


def _details(trailing_metadata: Sequence[tuple[str, str | bytes]]) -> list[ConnectAny]:
    """The google.rpc.Status details that grpc_status put in the trailing metadata."""
    for key, value in trailing_metadata:
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            return [ConnectAny(type_url=d.type_url, value=d.value) for d in status.details]
    return []


Interceptors = Sequence[grpc.aio.ServerInterceptor]


class ServicerBridge:
    """Answers the generated Connect service's methods with the gRPC servicer's methods."""

    def __init__(self, servicer: object, interceptors: Interceptors, max_in_flight: int
                 ) -> None:
        self._servicer = servicer
        self._interceptors = list(interceptors)
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        for method in SERVICE.methods:
            setattr(self, _snake(method.name), self._method(method.name))

    def _method(self, name: str) -> Callable[[Any, RequestContext], Awaitable[Any]]:
        path = f"/{SERVICE.full_name}/{name}"
        behavior = getattr(self._servicer, name)

        async def call(request: Any, ctx: RequestContext) -> Any:
            return await self.invoke(path, behavior, request, ctx)

        call.__name__ = _snake(name)
        return call

    async def invoke(self, path: str, behavior: Callable[..., Awaitable[Any]], request: Any,
                     ctx: RequestContext) -> Any:
        """Run one call through the interceptors and the servicer, as the gRPC server would."""
        metadata = tuple((k.lower(), v) for k, v in ctx.request_headers.allitems()
                         if k.lower() not in _NOT_METADATA)
        if self._in_flight >= self._max_in_flight:
            # grpc.aio's maximum_concurrent_rpcs, for this door
            raise ConnectError(Code.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!")
        self._in_flight += 1
        context = BridgeContext(ctx, metadata)
        try:
            handler = await self._intercepted(_CallDetails(path, metadata), behavior)
            if handler is None or handler.unary_unary is None:
                raise ConnectError(Code.UNIMPLEMENTED, f"method {path} is not implemented")
            return await _unless_client_goes(handler.unary_unary(request, context))
        except _Aborted as exc:
            raise ConnectError(connect_code(exc.code), exc.details,
                               _details(exc.trailing_metadata)) from None
        finally:
            self._in_flight -= 1

    async def _intercepted(self, details: _CallDetails, behavior: Callable[..., Awaitable[Any]]
                           ) -> grpc.RpcMethodHandler | None:
        async def step(i: int, d: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            if i == len(self._interceptors):
                return grpc.unary_unary_rpc_method_handler(behavior)
            return await self._interceptors[i].intercept_service(lambda nd: step(i + 1, nd), d)

        return await step(0, details)


async def _unless_client_goes(call: Awaitable[Any]) -> Any:
    """The call's result; cancelled (as grpc.aio cancels a call) once its client has gone."""
    gone = CLIENT_GONE.get()
    if gone is None:
        return await call
    task = asyncio.ensure_future(call)
    waiter = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ConnectError(Code.CANCELED, "the client went away")
    return task.result()


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class _CheckedCodec:
    """A codec whose undecodable requests are INVALID_ARGUMENT, as on the gRPC side."""

    def __init__(self, inner: Codec) -> None:
        self._inner = inner
        self._json = inner.name() == "json"

    def name(self) -> str:
        return self._inner.name()

    def encode(self, message: Any) -> bytes:
        if self._json:  # compact: no indentation, UTF-8 as is
            return json_format.MessageToJson(message, indent=None, ensure_ascii=False).encode()
        return self._inner.encode(message)

    def decode(self, data: bytes | bytearray, message_class: type) -> Any:
        try:
            return self._inner.decode(data, message_class)
        except Exception as exc:  # ParseError, DecodeError, RecursionError-like limits
            raise ConnectError(Code.INVALID_ARGUMENT,
                               f"request could not be decoded ({exc})") from None


class _Undecoded:
    """A codec that leaves the body as bytes: connectrpc reads it, and we decode it."""

    def __init__(self, inner: Codec) -> None:
        self._inner = inner

    def name(self) -> str:
        return self._inner.name()

    def decode(self, data: bytes | bytearray, message_class: type) -> bytes:
        return bytes(data)


class _GoogleProtobufMessages(ConnectASGIApplication):
    """Makes the generated application use google.protobuf messages (our _pb2 stubs)."""

    def __init__(self, **kwargs: Any) -> None:
        codecs = [_CheckedCodec(c) for c in google_protobuf_codecs()]
        super().__init__(**kwargs, codecs=codecs)


class ConnectApp(ClipSearchServiceASGIApplication, _GoogleProtobufMessages):
    """The generated ASGI application of ClipSearchService, over the gRPC servicer."""

    def __init__(self, servicer: object, interceptors: Interceptors, *, max_in_flight: int,
                 read_max_bytes: int) -> None:
        self.bridge = ServicerBridge(servicer, interceptors, max_in_flight)
        # JSON parsing is pure Python (about a second per 10 MiB of short strings): large
        # bodies are parsed here, two at a time, so the event loop goes on serving.
        self._decode_pool = ThreadPoolExecutor(2, thread_name_prefix="clipsearch-parse")
        super().__init__(self.bridge, read_max_bytes=read_max_bytes)  # type: ignore[arg-type]

    async def _read_post_request(self, endpoint: Any, receive: Any, codec: Codec,
                                 headers: Any) -> Any:
        """connectrpc's body reading (caps, compression), then the parse, off the event loop
        when the body is large."""
        body = await super()._read_post_request(endpoint, receive, _Undecoded(codec), headers)
        if len(body) < OFF_LOOP_DECODE_BYTES:
            return codec.decode(body, endpoint.method.input)
        return await asyncio.get_running_loop().run_in_executor(
            self._decode_pool, codec.decode, body, endpoint.method.input)
