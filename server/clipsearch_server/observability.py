"""Prometheus metrics and per-call request ids in the logs.

One interceptor times every call and counts it by method and status code; it also gives each
call a request id (the client's `x-request-id` metadata, or a new one), sends it back in the
trailing metadata, and makes it appear on every log line written while the call runs. As it
rebuilds each handler anyway, it also turns a request that cannot be decoded (nested past
protobuf's recursion limit, malformed) into INVALID_ARGUMENT instead of grpc's UNKNOWN.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The server's metrics, in a registry of their own (tests can build several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("clipsearch_requests_total", "Calls by method and status code",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("clipsearch_request_seconds", "Call latency by method",
                                 ["method"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("clipsearch_model_batch_size", "Inputs per model call",
                                    ["modality"], buckets=_BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("clipsearch_model_queue_depth",
                                 "Model calls waiting or running", registry=self.registry)
        self.model_load_seconds = Gauge("clipsearch_model_load_seconds",
                                        "Time the model took to load", registry=self.registry)
        self.in_flight = Gauge("clipsearch_requests_in_flight", "Calls being served",
                               registry=self.registry)

    def watch_collections(self, counts: Callable[[], Iterable[tuple[str, int]]]) -> None:
        """Export items per collection, read at scrape time."""
        self.registry.register(_CollectionItems(counts))

    def serve_http(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)


class _CollectionItems(Collector):
    def __init__(self, counts: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("clipsearch_collection_items", "Items per collection",
                                   labels=["collection"])
        for name, count in self._counts():
            family.add_metric([name], count)
        yield family


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, latency and status counts for every unary call."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        given = dict(details.invocation_metadata or ()).get("x-request-id", "")
        behavior = handler.unary_unary
        decode = handler.request_deserializer
        metrics = self.metrics

        def safe_decode(data: bytes) -> Any:
            try:
                return decode(data) if decode is not None else data
            except Exception as exc:  # DecodeError, or RecursionError-like limits
                return _Undecodable(str(exc) or type(exc).__name__)

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            rid = given[:64] if given.isprintable() and given else uuid.uuid4().hex[:16]
            request_id.set(rid)
            context.set_trailing_metadata((("x-request-id", rid),))
            started = time.perf_counter()
            metrics.in_flight.inc()
            code = "OK"
            try:
                if isinstance(request, _Undecodable):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"request could not be decoded ({request.reason}); is it nested "
                        "too deeply (metadata or filters past 100 levels)?")
                return await behavior(request, context)
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except BaseException:
                code = "CANCELLED" if context.cancelled() else "UNKNOWN"
                raise
            finally:
                metrics.in_flight.dec()
                metrics.requests.labels(method, code).inc()
                metrics.latency.labels(method).observe(time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            observed, request_deserializer=safe_decode,
            response_serializer=handler.response_serializer)


class _Undecodable:
    """Stands in for a request whose bytes did not decode."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else str(code or "UNKNOWN")


class RequestIdFilter(logging.Filter):
    """Puts the current call's request id on every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: str) -> None:
    """Text (human) or JSON (machine) logs on stderr, each line with its request id."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
