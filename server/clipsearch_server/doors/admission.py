"""Separate budgets of concurrent calls, so that open endpoints cannot starve the service.

Health and reflection need no token, and their streams (Health/Watch, ServerReflectionInfo)
stay open as long as a client likes. Under grpc's single `maximum_concurrent_rpcs` cap, an
unauthenticated client holding enough Watch streams took every slot, and authenticated calls
and even Health/Check were refused. So this interceptor, placed after authentication, keeps
two budgets of its own:

* ClipSearch calls: at most `--max-concurrent-rpcs` at once (what grpc's cap did before);
* open streams (health and reflection): at most `--max-open-streams` at once.

Unary health checks are short and stay outside both. grpc's own cap is set above the sum
(see `grpc_concurrency_cap`) so that it only bounds what neither budget counts, such as calls
refused by authentication. A call beyond its budget gets RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from .auth import OPEN_SERVICES


def grpc_concurrency_cap(max_service_calls: int, max_open_streams: int) -> int:
    """grpc's global cap: both budgets, plus as many again for short unbudgeted calls."""
    return 2 * max_service_calls + max_open_streams


class _Slots:
    """A count of calls in flight against a limit (the event loop is single-threaded)."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.used = 0
        self.what = what

    def refusal(self) -> str:
        return f"too many {self.what} at once (limit {self.limit}); retry later"


class CallBudgetInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls beyond their budget with RESOURCE_EXHAUSTED."""

    def __init__(self, max_service_calls: int, max_open_streams: int) -> None:
        self.service = _Slots(max_service_calls, "calls")
        self.open_streams = _Slots(max_open_streams, "health or reflection streams")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        if details.method.startswith(OPEN_SERVICES):
            if handler.unary_unary is not None:
                return handler  # Health/Check: short, and must answer under any load
            return _budgeted(handler, self.open_streams)
        return _budgeted(handler, self.service)


def _budgeted(handler: grpc.RpcMethodHandler, slots: _Slots) -> grpc.RpcMethodHandler:
    """The same handler, taking one of `slots` for the call's whole life."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for kind, make in kinds:
        behavior = getattr(handler, kind)
        if behavior is not None:
            return make(_wrap(behavior, slots), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


def _wrap(behavior: Callable[..., Any], slots: _Slots) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if slots.used >= slots.limit:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, slots.refusal())
            slots.used += 1
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                slots.used -= 1

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if slots.used >= slots.limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, slots.refusal())
        slots.used += 1
        try:
            return await behavior(request, context)
        finally:
            slots.used -= 1

    return call
