"""Server assembly: settings, model, collections, gRPC services, signals and shutdown.

Start-up order: bind the port and answer health NOT_SERVING at once (so orchestrators see a
live process), load the model and open the collections off the event loop, then flip health to
SERVING. SIGTERM or SIGINT: health NOT_SERVING, stop taking calls, let in-flight calls finish
within the grace period, snapshot every changed index, close the stores. A second signal exits
at once (the store is the source of truth, so nothing acknowledged is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clipsearch.v1 import clipsearch_pb2, clipsearch_pb2_grpc

from . import analysis
from .config import Settings, parse_settings
from .datadir import DataDirBusy, DataDirLock, raise_descriptor_limit
from .doors.admission import CallBudgetInterceptor, grpc_concurrency_cap
from .doors.auth import BearerTokenInterceptor, TokenTable, load_tokens, server_credentials
from .doors.http_limits import grpc_connection_options
from .doors.http_server import HttpApp, HttpServer
from .encoders import open_encoder
from .errors import ClipSearchError, ModelLoadError
from .observability import Metrics, ObservabilityInterceptor, configure_logging
from .service import ClipSearchServicer
from .stores import CollectionRegistry, open_collections

log = logging.getLogger("clipsearch_server")

# Each part of the server receives only its groups of settings (settings.SettingsView);
# app.py, which assembles them, is the one place that holds them all.
ENCODER = ("model", "limits", "engines", "index")  # index: data_dir holds the ONNX graphs
STORE = ("index", "engines")
SERVICER = ("limits", "index")
HTTP_APP = ("http", "limits")
HTTP_DOOR = ("http", "server")
GRPC_DOOR = ("server",)
SERVICE_NAME = clipsearch_pb2.DESCRIPTOR.services_by_name["ClipSearchService"].full_name
RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: this server's embeddings are meaningless for search; use it only to try "
    "the API or to benchmark"
)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `clipsearch serve` and `clipsearch-server`."""
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    return asyncio.run(serve(settings))


async def serve(settings: Settings) -> int:
    """Run the server until a signal; returns the process exit code."""
    if settings.store != "local":  # the engine guards its own data; fronts share it
        return await _serve(settings)
    data_lock = DataDirLock(settings.data_dir)
    try:
        data_lock.acquire()
    except (DataDirBusy, OSError) as exc:
        log.error("%s", exc)
        return 2
    try:
        return await _serve(settings)
    finally:
        data_lock.release()


async def _serve(settings: Settings) -> int:
    # Each client connection holds a descriptor too: the doors' limits come out of the budget.
    collection_room = raise_descriptor_limit(settings.grpc_max_connections + (
        settings.http_max_connections if settings.http_port else 0))
    limit = settings.max_message_bytes
    metrics = Metrics()
    interceptors: list[grpc.aio.ServerInterceptor] = [ObservabilityInterceptor(metrics)]
    try:
        tokens = TokenTable(load_tokens(settings.auth_tokens_file,
                                        os.environ.get("CLIPSEARCH_AUTH_TOKENS")))
    except (OSError, ClipSearchError) as exc:
        log.error("cannot read auth tokens: %s", exc)
        return 2
    if tokens:
        interceptors.append(BearerTokenInterceptor(tokens))
    # After authentication: ClipSearch calls and open streams get budgets of their own.
    interceptors.append(CallBudgetInterceptor(settings.max_concurrent_rpcs,
                                              settings.max_open_streams))
    server = grpc.aio.server(
        interceptors=interceptors,
        # Calls beyond this are refused with RESOURCE_EXHAUSTED: with the message limit, this
        # bounds the memory that requests in flight can take.
        maximum_concurrent_rpcs=grpc_concurrency_cap(settings.max_concurrent_rpcs,
                                                     settings.max_open_streams),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # keepalive, idle and age limits, handshake timeout, connection limit
            *grpc_connection_options(settings.only(*GRPC_DOOR)),
        ],
    )
    servicer = ClipSearchServicer(settings.only(*SERVICER))
    clipsearch_pb2_grpc.add_ClipSearchServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{settings.host}:{settings.port}"
    try:
        if settings.tls_cert is not None and settings.tls_key is not None:
            credentials = server_credentials(settings.tls_cert, settings.tls_key,
                                             settings.tls_client_ca)
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        if settings.metrics_port:
            metrics.serve_http(settings.metrics_host, settings.metrics_port)
        # The same servicer and interceptors answer HTTP calls (Connect, gRPC-Web, JSON).
        http = (HttpServer(HttpApp(servicer, interceptors, settings.only(*HTTP_APP), tokens),
                           settings.only(*HTTP_DOOR))
                if settings.http_port else None)
    except (RuntimeError, OSError) as exc:
        log.error("cannot listen on %s (HTTP %s:%d): %s", address, settings.http_host,
                  settings.http_port, exc)
        return 2
    await server.start()
    if http is not None:
        try:
            await http.start()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.error("cannot serve HTTP on %s:%d: %s", settings.http_host, http.port, exc)
            return await _give_up(server, None)
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    security = ("mutual TLS" if settings.tls_client_ca else "TLS" if settings.tls_cert
                else "plaintext")
    log.info("listening on %s:%d (%s, %s; loading model)", settings.host, port, security,
             f"{len(tokens)} auth tokens" if tokens else "no authentication")
    if settings.metrics_port:
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)

    stop = asyncio.Event()
    _install_signal_handlers(stop)

    try:
        # scikit-learn's import holds the GIL for seconds: done now, beside the model load,
        # rather than in the first Cluster call while searches wait.
        libraries = asyncio.create_task(asyncio.to_thread(analysis.import_libraries))
        encoder = await asyncio.to_thread(open_encoder, settings.only(*ENCODER), metrics)
    except (ModelLoadError, RuntimeError, ClipSearchError) as exc:
        log.error("model load failed: %s", exc)
        return await _give_up(server, http)
    # Joining Ray installs its own SIGTERM handler (a stack dump, then an abort): ours again.
    _install_signal_handlers(stop)
    model = encoder.info
    metrics.model_load_seconds.set(model.load_seconds)
    log.info("model %s (%s) loaded on %s, %s, dim %d, in %.1fs; fingerprint %s",
             model.name, settings.weights_source if settings.encoder == "local" else "encoder",
             model.device, model.precision, model.dim, model.load_seconds, model.fingerprint)
    log.info("precision %s: %s", model.precision, model.precision_reason)
    log.info("backend %s: %s", model.backend, model.backend_reason)
    log.info("encoder: %s", encoder.describe())
    if model.random_weights:
        log.warning(RANDOM_WEIGHTS_WARNING)

    try:
        collections = open_collections(settings.only(*STORE), model.dim, model.fingerprint)
        await asyncio.to_thread(collections.open_all)
    except (ClipSearchError, OSError) as exc:
        log.error("cannot open the collection store: %s", exc)
        encoder.close()
        return await _give_up(server, http)
    metrics.watch_collections(collections.counts)
    await libraries
    servicer.ready(encoder, collections)
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    log.info("ready: %d collections in %s", len(collections.names()), collections.describe())
    if collections.unavailable:
        log.error("not serving %d collections that could not be opened: %s",
                  len(collections.unavailable), ", ".join(sorted(collections.unavailable)))
    if len(collections.names()) + len(collections.unavailable) > collection_room:
        log.warning("%d collections but the open-file limit leaves room for about %d: raise "
                    "the hard limit (ulimit -Hn, LimitNOFILE=)",
                    len(collections.names()) + len(collections.unavailable), collection_room)
    if http is not None:
        log.info("search page: %s", http.url)

    snapshots = asyncio.create_task(_snapshot_periodically(collections, settings))
    await stop.wait()

    log.info("shutting down: draining calls for up to %.0fs", settings.shutdown_grace_s)
    await health_servicer.enter_graceful_shutdown()
    await asyncio.gather(server.stop(settings.shutdown_grace_s),
                         http.stop() if http is not None else asyncio.sleep(0))
    snapshots.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await snapshots
    # Snapshots only spare the next start a replay from the stores: they get a bounded time.
    await asyncio.to_thread(collections.snapshot_all, False, settings.shutdown_snapshot_s)
    await asyncio.to_thread(collections.close_all)
    encoder.close()
    log.info("stopped")
    return 0


async def _give_up(server: grpc.aio.Server, http: HttpServer | None) -> int:
    """Stop the doors opened so far after a failed start; the exit code of that failure."""
    await server.stop(0)
    if http is not None:
        await http.stop()
    return 2


async def _set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def _snapshot_periodically(collections: CollectionRegistry, settings: Settings
                                 ) -> None:
    """Keep snapshots recent so a restart replays little of the store."""
    while True:
        await asyncio.sleep(settings.snapshot_interval_s)
        await asyncio.to_thread(collections.snapshot_all)
