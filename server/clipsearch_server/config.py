"""Server settings: command-line flags, each with a CLIPSEARCH_* environment fallback.

Precedence is flag > environment > default, so a container can be configured by environment
and a person can still override one thing on the command line.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

from .catalog import default_pretrained

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
# Longest connection timeout: gRPC core takes milliseconds as a C int (about 24.8 days).
MAX_TIMEOUT_S = 2_000_000


@dataclass(frozen=True)
class Settings:
    """Everything the server reads at start; immutable afterwards."""

    host: str = "127.0.0.1"
    port: int = 50051
    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    checkpoint: Path | None = None
    random_weights: bool = False
    model_config_dir: Path | None = None
    cache_dir: Path | None = None
    data_dir: Path = Path("data")
    device: str = "auto"
    precision: str = "auto"
    max_message_bytes: int = 64 * 1024 * 1024
    max_json_bytes: int = 8 * 1024 * 1024
    max_batch_size: int = 64
    max_items_per_request: int = 4096
    max_k: int = 1000
    default_ef: int = 64
    default_ef_text: int = 192
    max_ef: int = 4096
    max_image_pixels: int = 40_000_000
    decode_threads: int = 4
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    snapshot_interval_s: float = 60.0
    shutdown_grace_s: float = 10.0
    # With the drain (10 s), shutdown stays well inside Kubernetes' default 30 s grace period.
    shutdown_snapshot_s: float = 5.0
    log_level: str = "INFO"
    log_format: str = "text"
    max_concurrent_rpcs: int = 64
    max_heavy_calls: int = 4
    max_heavy_calls_per_caller: int = 2
    max_duplicates_work: int = 1 << 26
    max_cluster_work: int = 1 << 27
    max_open_streams: int = 16
    max_decoded_bytes: int = 1 << 30
    max_queued_batches: int = 64
    batch_wait_ms: float = 2.0
    max_model_call_ms: float = 100.0
    text_cache_size: int = 4096
    jpeg_draft: bool = True
    device_decode: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    auth_tokens_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    http_header_timeout_s: float = 10.0
    http_body_timeout_s: float = 60.0
    http_max_connections: int = 512
    grpc_keepalive_time_s: float = 60.0
    grpc_keepalive_timeout_s: float = 20.0
    grpc_min_ping_interval_s: float = 10.0
    grpc_max_connection_idle_s: float = 300.0
    grpc_max_connection_age_s: float = 0.0
    grpc_max_connection_age_grace_s: float = 30.0
    grpc_handshake_timeout_s: float = 10.0
    grpc_max_connections: int = 512
    allowed_hosts: tuple[str, ...] = ()
    encoder: str = "local"
    ray_address: str = "auto"
    ray_app: str = "clipsearch-encoder"
    ray_max_in_flight: int = 64
    store: str = "local"
    store_uri: str = ""
    store_token: str = ""

    @property
    def weights_source(self) -> str:
        """The one place weights come from, for messages and server info."""
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint}"
        if self.random_weights:
            return "random weights"
        return f"pretrained tag {self.pretrained}"


def _env(name: str) -> str | None:
    value = os.environ.get(f"CLIPSEARCH_{name.upper()}")
    return value if value not in (None, "") else None


def _env_bool(name: str) -> bool:
    value = _env(name)
    return value is not None and value.lower() in ("1", "true", "yes", "on")


def _names(value: str) -> tuple[str, ...]:
    """A comma-separated list of names."""
    return tuple(n.strip().lower() for n in value.split(",") if n.strip())


def build_parser() -> argparse.ArgumentParser:
    """The `clipsearch serve` flags; every default can also come from CLIPSEARCH_<FLAG>."""
    d = Settings()
    p = argparse.ArgumentParser(
        prog="clipsearch serve",
        usage="%(prog)s [options]",  # a usage error is two lines, not the 40 of every flag
        description="Serve CLIP embeddings and HNSW search over gRPC. Every flag can also be "
        "set as an environment variable CLIPSEARCH_<FLAG> (e.g. CLIPSEARCH_DATA_DIR).",
    )

    def opt(flag: str, typ: type, default: object, help_: str) -> None:
        name = flag.lstrip("-").replace("-", "_")
        env = _env(name)
        p.add_argument(flag, type=typ, default=typ(env) if env is not None else default,
                       help=f"{help_} (default: %(default)s; env CLIPSEARCH_{name.upper()})")

    opt("--host", str, d.host, "address to listen on; 0.0.0.0 for all interfaces")
    opt("--port", int, d.port, "port to listen on")
    opt("--model", str, d.model, "open_clip architecture name, e.g. ViT-B-32, ViT-L-14")
    weights = p.add_mutually_exclusive_group()
    env_pretrained = _env("pretrained")
    weights.add_argument("--pretrained", default=env_pretrained,
                         help=f"open_clip pretrained tag, downloaded on first use (default: "
                         f"{DEFAULT_PRETRAINED} for {DEFAULT_MODEL}, else the catalog's choice; "
                         "env CLIPSEARCH_PRETRAINED)")
    def path_opt(group: argparse._ActionsContainer, flag: str, help_: str) -> None:
        name = flag.lstrip("-").replace("-", "_")
        env = _env(name)
        group.add_argument(flag, type=Path, default=Path(env) if env else None,
                           help=f"{help_} (env CLIPSEARCH_{name.upper()})")

    path_opt(weights, "--checkpoint",
             "local open_clip checkpoint file (.pt, .bin or .safetensors); works offline")
    weights.add_argument("--random-weights", action="store_true",
                         default=_env_bool("random_weights"),
                         help="random weights: for trying the API and benchmarking only, "
                         "search results are meaningless (env CLIPSEARCH_RANDOM_WEIGHTS)")
    path_opt(p, "--model-config-dir", "extra folder of open_clip model config JSON files")
    path_opt(p, "--cache-dir", "where downloaded weights are cached")
    opt("--data-dir", Path, d.data_dir, "folder holding the collections")
    opt("--device", str, d.device, "auto (cuda when present, else cpu), cpu, cuda or cuda:N")
    opt("--precision", str, d.precision,
        "auto (bf16 where the GPU or CPU computes it natively, fp16 on older GPUs, else "
        "fp32), fp32 (exact parity with open_clip), fp16 (GPU only) or bf16")
    opt("--channels-last", str, d.channels_last,
        "image tower in channels-last memory format: auto (on for cuda), on or off")
    p.add_argument("--compile", action="store_true", default=_env_bool("compile"),
                   help="torch.compile the towers: slower start, faster steady state "
                   "(env CLIPSEARCH_COMPILE)")
    opt("--max-message-bytes", int, d.max_message_bytes,
        "largest request accepted and largest reply built, bytes (replies past it are "
        "refused with RESOURCE_EXHAUSTED, or cut into pages for listings)")
    opt("--max-json-bytes", int, d.max_json_bytes,
        "largest JSON request body the HTTP door reads, bytes (JSON costs far more to parse "
        "than binary protobuf, which --max-message-bytes bounds)")
    opt("--max-batch-size", int, d.max_batch_size, "most inputs in one model call")
    opt("--max-items-per-request", int, d.max_items_per_request,
        "most texts, images or items in one request")
    opt("--max-k", int, d.max_k, "largest k a search accepts")
    opt("--default-ef", int, d.default_ef, "HNSW ef of a search that does not set one")
    opt("--default-ef-text", int, d.default_ef_text,
        "HNSW ef of a text query that does not set one: text embeddings sit apart from image "
        "embeddings (the modality gap) and need a longer candidate list for the same recall")
    opt("--max-ef", int, d.max_ef, "largest ef a search may ask for")
    opt("--max-image-pixels", int, d.max_image_pixels,
        "images with more pixels are refused (decompression-bomb guard)")
    opt("--decode-threads", int, d.decode_threads, "threads decoding images")
    opt("--hnsw-m", int, d.hnsw_m, "HNSW links per node for new collections")
    opt("--hnsw-ef-construction", int, d.hnsw_ef_construction,
        "HNSW build-time candidate list for new collections")
    opt("--snapshot-interval-s", float, d.snapshot_interval_s,
        "seconds between background index snapshots of changed collections")
    opt("--shutdown-grace-s", float, d.shutdown_grace_s,
        "seconds in-flight calls get to finish on SIGTERM")
    opt("--shutdown-snapshot-s", float, d.shutdown_snapshot_s,
        "seconds that saving changed indexes may take at shutdown, most changed first; the "
        "rest are replayed from the store at the next start (nothing is lost)")
    opt("--log-level", str, d.log_level, "DEBUG, INFO, WARNING or ERROR")
    opt("--log-format", str, d.log_format, "text, or json for one JSON object per line")
    opt("--max-concurrent-rpcs", int, d.max_concurrent_rpcs,
        "calls served at once; more are refused with RESOURCE_EXHAUSTED (bounds memory)")
    opt("--max-heavy-calls", int, d.max_heavy_calls,
        "FindDuplicates, Cluster, Recommend and Classify calls running at once, in a pool of "
        "their own at low CPU priority; more are refused with RESOURCE_EXHAUSTED")
    opt("--max-heavy-calls-per-caller", int, d.max_heavy_calls_per_caller,
        "of those, how many one token (or, without authentication, one client address) may "
        "run at once")
    opt("--max-duplicates-work", int, d.max_duplicates_work,
        "FindDuplicates calls whose items x max(ef, neighbors + 1) exceed this are refused "
        "up front with RESOURCE_EXHAUSTED")
    opt("--max-cluster-work", int, d.max_cluster_work,
        "Cluster calls whose items x n_clusters exceed this are refused up front with "
        "RESOURCE_EXHAUSTED")
    opt("--max-open-streams", int, d.max_open_streams,
        "health Watch and reflection streams (which need no token) open at once, apart from "
        "--max-concurrent-rpcs; more are refused with RESOURCE_EXHAUSTED")
    opt("--max-decoded-bytes", int, d.max_decoded_bytes,
        "decoded image tensors held at once across all requests, in bytes; calls that wait "
        "past 10 s for room are refused with RESOURCE_EXHAUSTED")
    opt("--max-queued-batches", int, d.max_queued_batches,
        "model batches waiting at once; more are refused with RESOURCE_EXHAUSTED")
    opt("--batch-wait-ms", float, d.batch_wait_ms,
        "how long a model batch that is not full waits for inputs from other calls")
    opt("--max-model-call-ms", float, d.max_model_call_ms,
        "bulk model batches run as calls of about this long (sized from the measured cost per "
        "input), so a search waits for at most one; 0 = whole batches")
    opt("--text-cache-size", int, d.text_cache_size,
        "recent query texts whose embeddings are kept; 0 = no cache")
    env_draft = _env("jpeg_draft")
    p.add_argument("--jpeg-draft", action=argparse.BooleanOptionalAction,
                   default=d.jpeg_draft if env_draft is None else _env_bool("jpeg_draft"),
                   help="decode large JPEGs at a reduced scale (within a tested tolerance of "
                   "the full decode); --no-jpeg-draft for open_clip's exact preprocessing "
                   "(env CLIPSEARCH_JPEG_DRAFT)")
    opt("--device-decode", str, d.device_decode,
        "decode JPEGs and resize them on the model's device (nvjpeg): auto = on with CUDA, "
        "on, off; other formats always decode on the CPU")
    path_opt(p, "--auth-tokens-file",
             "file of accepted bearer tokens, one per line; CLIPSEARCH_AUTH_TOKENS adds "
             "comma-separated ones. Without either, calls are not authenticated")
    path_opt(p, "--tls-cert", "server certificate chain (PEM): serve TLS")
    path_opt(p, "--tls-key", "server private key (PEM)")
    path_opt(p, "--tls-client-ca", "CA (PEM) that client certificates must chain to: mutual TLS")
    opt("--metrics-host", str, d.metrics_host, "address of the Prometheus metrics endpoint")
    opt("--metrics-port", int, d.metrics_port, "port of the Prometheus metrics endpoint; 0 = off")
    opt("--http-host", str, d.http_host, "address of the HTTP door (Connect/gRPC-Web/JSON API "
        "and the search page); TLS settings apply to it too")
    opt("--http-port", int, d.http_port, "port of the HTTP door; 0 = off")
    opt("--http-header-timeout-s", float, d.http_header_timeout_s,
        "a request head must arrive whole within this many seconds of the connection opening "
        "or of the previous response, or the connection is closed (408)")
    opt("--http-body-timeout-s", float, d.http_body_timeout_s,
        "a request body must arrive whole within this many seconds of its head, or the "
        "connection is closed (408)")
    opt("--http-max-connections", int, d.http_max_connections,
        "HTTP connections open at once; more are answered 503 and closed; 0 = no limit")
    opt("--grpc-keepalive-time-s", float, d.grpc_keepalive_time_s,
        "the gRPC door pings a connection quiet for this long, to find vanished clients")
    opt("--grpc-keepalive-timeout-s", float, d.grpc_keepalive_timeout_s,
        "a connection whose ping is not answered within this many seconds is closed")
    opt("--grpc-min-ping-interval-s", float, d.grpc_min_ping_interval_s,
        "clients may ping this often without calls; faster pings close the connection")
    opt("--grpc-max-connection-idle-s", float, d.grpc_max_connection_idle_s,
        "a gRPC connection without calls for this long is closed (GOAWAY; clients reconnect "
        "on their next call); 0 = never")
    opt("--grpc-max-connection-age-s", float, d.grpc_max_connection_age_s,
        "a gRPC connection older than this is asked to reconnect (spreads clients over "
        "replicas behind a TCP load balancer); 0 = never")
    opt("--grpc-max-connection-age-grace-s", float, d.grpc_max_connection_age_grace_s,
        "calls still running on a connection past its age get this long before it is closed")
    opt("--grpc-handshake-timeout-s", float, d.grpc_handshake_timeout_s,
        "a gRPC connection must finish its TLS and HTTP/2 handshake within this many seconds")
    opt("--grpc-max-connections", int, d.grpc_max_connections,
        "gRPC connections open at once; more are closed as they are accepted; 0 = no limit")
    env_hosts = _env("allowed_hosts")
    p.add_argument("--allowed-hosts", type=_names, default=_names(env_hosts or ""),
                   help="with authentication off, the HTTP door answers only Host values "
                   "naming its address or localhost (against DNS rebinding): comma-separated "
                   "further host names to answer, and whose pages may call the API; * for "
                   "any (env CLIPSEARCH_ALLOWED_HOSTS)")
    engines = p.add_argument_group("scaling out (README: Scaling out)")

    def engine_opt(flag: str, default: str, help_: str) -> None:
        name = flag.lstrip("-").replace("-", "_")
        env = _env(name)
        shown = "default: %(default)s; " if default else ""
        engines.add_argument(flag, default=env if env is not None else default,
                             help=f"{help_} ({shown}env CLIPSEARCH_{name.upper()})")

    engine_opt("--encoder", d.encoder,
               "local: the model runs in this process; ray: a Ray Serve deployment of the "
               "encoder (deploy/ray/serve.yaml), called through Serve handles")
    engine_opt("--ray-address", d.ray_address, "Ray cluster to join with --encoder ray: auto "
               "(the local one), ray://host:10001, or host:6379")
    engine_opt("--ray-app", d.ray_app, "name of the Serve application holding the encoder")
    engines.add_argument("--ray-max-in-flight", type=int,
                         default=int(_env("ray_max_in_flight") or d.ray_max_in_flight),
                         help="encoder calls this front keeps in flight to Ray at once "
                         "(default: %(default)s; env CLIPSEARCH_RAY_MAX_IN_FLIGHT)")
    engine_opt("--store", d.store, "local: SQLite + hnswlib under --data-dir; milvus: one "
               "Milvus collection per clipsearch collection, at --store-uri")
    engine_opt("--store-uri", d.store_uri, "with --store milvus: a Milvus Lite file (by "
               "default <data-dir>/milvus.db) or a Milvus server, http://host:19530")
    engine_opt("--store-token", d.store_token, "with --store milvus: the Milvus token "
               "(user:password or an API key); prefer the environment variable")
    return p


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Parse flags (and environment) into validated Settings; exits with usage on error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(Settings) if hasattr(args, f.name)}
    if values.get("checkpoint") is not None or values.get("random_weights"):
        values["pretrained"] = None
    elif values.get("pretrained") is None:
        values["pretrained"] = default_pretrained(args.model) or ""
    settings = Settings(**values)
    problem = validate(settings)
    if problem:
        parser.error(problem)
    return settings


def validate(s: Settings) -> str | None:
    """The first thing wrong with the settings, as a sentence, or None."""
    if s.device != "auto" and s.device != "cpu" and not s.device.startswith("cuda"):
        return f"--device must be auto, cpu, cuda or cuda:N, not {s.device!r}"
    if s.channels_last not in ("auto", "on", "off"):
        return f"--channels-last must be auto, on or off, not {s.channels_last!r}"
    if s.device_decode not in ("auto", "on", "off"):
        return f"--device-decode must be auto, on or off, not {s.device_decode!r}"
    if s.precision not in ("auto", "fp32", "fp16", "bf16"):
        return f"--precision must be auto, fp32, fp16 or bf16, not {s.precision!r}"
    if s.encoder not in ("local", "ray"):
        return f"--encoder must be local or ray, not {s.encoder!r}"
    if s.store not in ("local", "milvus"):
        return f"--store must be local or milvus, not {s.store!r}"
    if s.store_uri and s.store != "milvus":
        return "--store-uri goes with --store milvus"
    if s.ray_max_in_flight < 1:
        return "--ray-max-in-flight must be at least 1"
    if not 0 <= s.port <= 65535:
        return f"--port must be 0..65535, not {s.port}"
    if not 0 <= s.http_port <= 65535:
        return f"--http-port must be 0..65535 (0 = off), not {s.http_port}"
    for name in ("max_message_bytes", "max_batch_size", "max_items_per_request", "max_k",
                 "max_concurrent_rpcs", "max_open_streams", "max_decoded_bytes",
                 "max_json_bytes", "max_heavy_calls", "max_heavy_calls_per_caller",
                 "max_duplicates_work", "max_cluster_work",
                 "max_queued_batches",
                 "default_ef", "default_ef_text", "max_ef",
                 "max_image_pixels", "decode_threads", "hnsw_m", "hnsw_ef_construction"):
        if getattr(s, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    for name in ("http_header_timeout_s", "http_body_timeout_s", "grpc_keepalive_time_s",
                 "grpc_keepalive_timeout_s", "grpc_handshake_timeout_s"):
        if not 0 < getattr(s, name) <= MAX_TIMEOUT_S:
            return f"--{name.replace('_', '-')} must be more than 0 and at most {MAX_TIMEOUT_S}"
    for name in ("grpc_min_ping_interval_s", "grpc_max_connection_idle_s",
                 "grpc_max_connection_age_s", "grpc_max_connection_age_grace_s"):
        if not 0 <= getattr(s, name) <= MAX_TIMEOUT_S:
            return f"--{name.replace('_', '-')} must be 0..{MAX_TIMEOUT_S}"
    if s.http_max_connections < 0 or s.grpc_max_connections < 0:
        return "--http-max-connections and --grpc-max-connections cannot be negative (0 = no limit)"
    if s.shutdown_snapshot_s < 0:
        return "--shutdown-snapshot-s cannot be negative"
    if s.batch_wait_ms < 0 or s.text_cache_size < 0 or s.max_model_call_ms < 0:
        return "--batch-wait-ms, --text-cache-size and --max-model-call-ms cannot be negative"
    if s.log_format not in ("text", "json"):
        return f"--log-format must be text or json, not {s.log_format!r}"
    if (s.tls_cert is None) != (s.tls_key is None):
        return "--tls-cert and --tls-key go together"
    if s.tls_client_ca is not None and s.tls_cert is None:
        return "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"
    for flag, path in (("--checkpoint", s.checkpoint), ("--auth-tokens-file", s.auth_tokens_file),
                       ("--tls-cert", s.tls_cert), ("--tls-key", s.tls_key),
                       ("--tls-client-ca", s.tls_client_ca)):
        if path is not None and not path.is_file():
            return f"{flag} {path} is not a file"
    return None
