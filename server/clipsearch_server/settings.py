"""Every server setting, declared once.

Each field of `Settings` carries, in its metadata, what the rest is built from: the help, the
argument group, the choices (an Enum) and the range. `config.py` turns the declarations into the
`clipsearch serve` flags (`--max-k` for `max_k`), their CLIPSEARCH_<NAME> environment fallbacks,
and the generic checks of choices and ranges; README's configuration tables are checked against
them by tests/unit/test_settings.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
# Longest connection timeout: gRPC core takes milliseconds as a C int (about 24.8 days).
MAX_TIMEOUT_S = 2_000_000

# Argument groups, in the order --help shows them: (title, description).
GROUPS: dict[str, tuple[str, str | None]] = {
    "server": ("server and TLS", "the gRPC door, its TLS, tokens, connections and logs"),
    "http": ("HTTP door", "Connect/gRPC-Web/JSON API, thumbnails and the search page"),
    "model": ("model", "which CLIP model, where it runs, and how inputs reach it"),
    "limits": ("limits", "bounds on requests and on the work held at once"),
    "index": ("index", "collections on disk and their HNSW graphs"),
    "engines": ("engines (README: Scaling out)", "where the encoder and the store run"),
}


class OnOff(str, Enum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Precision(str, Enum):
    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


class Backend(str, Enum):
    AUTO = "auto"
    TORCH = "torch"
    ONNX = "onnx"


class LogFormat(str, Enum):
    TEXT = "text"
    JSON = "json"


class EncoderKind(str, Enum):
    LOCAL = "local"
    RAY = "ray"


class StoreKind(str, Enum):
    LOCAL = "local"
    MILVUS = "milvus"


def names(value: str) -> tuple[str, ...]:
    """A comma-separated list of names."""
    return tuple(n.strip().lower() for n in value.split(",") if n.strip())


def setting(default: Any, help: str, *, group: str, type: Any = None,
            choices: type[Enum] | None = None, minimum: float | None = None,
            maximum: float | None = None, above: float | None = None, negatable: bool = False,
            exclusive: str | None = None, shown: str | None = None, note: str = "") -> Any:
    """One setting's declaration: a dataclass field whose metadata builds its flag and checks.

    type: parses the flag and environment text (default: the default's type; a bool is a
    switch, `negatable` adds --no-<flag>). minimum/maximum: inclusive bounds; above: exclusive
    lower bound. exclusive: a mutually exclusive set of flags. shown: the default as --help
    says it, where the value itself would mislead. note: added to a range error.
    """
    assert group in GROUPS, group
    meta = {"help": help, "group": group, "type": type or _type_of(default),
            "choices": tuple(c.value for c in choices) if choices else None,
            "minimum": minimum, "maximum": maximum, "above": above, "negatable": negatable,
            "exclusive": exclusive, "shown": shown, "note": note}
    return field(default=default, metadata=meta)


def _type_of(default: Any) -> Any:
    if isinstance(default, tuple):
        return names
    return default.__class__


_AT_LEAST_1 = {"minimum": 1}
_NON_NEGATIVE = {"minimum": 0}
_TIMEOUT = {"above": 0, "maximum": MAX_TIMEOUT_S}
_TIMEOUT_OR_0 = {"minimum": 0, "maximum": MAX_TIMEOUT_S}


@dataclass(frozen=True)
class Settings:
    """Everything the server reads at start; immutable afterwards."""

    # -- server and TLS
    host: str = setting("127.0.0.1", "address to listen on; 0.0.0.0 for all interfaces",
                        group="server")
    port: int = setting(50051, "port to listen on", group="server", minimum=0, maximum=65535)
    auth_tokens_file: Path | None = setting(
        None, "file of accepted bearer tokens, one per line; CLIPSEARCH_AUTH_TOKENS adds "
        "comma-separated ones. Without either, calls are not authenticated",
        group="server", type=Path)
    tls_cert: Path | None = setting(None, "server certificate chain (PEM): serve TLS",
                                    group="server", type=Path)
    tls_key: Path | None = setting(None, "server private key (PEM)", group="server", type=Path)
    tls_client_ca: Path | None = setting(
        None, "CA (PEM) that client certificates must chain to: mutual TLS",
        group="server", type=Path)
    metrics_host: str = setting("127.0.0.1", "address of the Prometheus metrics endpoint",
                                group="server")
    metrics_port: int = setting(0, "port of the Prometheus metrics endpoint; 0 = off",
                                group="server")
    grpc_keepalive_time_s: float = setting(
        60.0, "the gRPC door pings a connection quiet for this long, to find vanished clients",
        group="server", **_TIMEOUT)
    grpc_keepalive_timeout_s: float = setting(
        20.0, "a connection whose ping is not answered within this many seconds is closed",
        group="server", **_TIMEOUT)
    grpc_min_ping_interval_s: float = setting(
        10.0, "clients may ping this often without calls; faster pings close the connection",
        group="server", **_TIMEOUT_OR_0)
    grpc_max_connection_idle_s: float = setting(
        300.0, "a gRPC connection without calls for this long is closed (GOAWAY; clients "
        "reconnect on their next call); 0 = never", group="server", **_TIMEOUT_OR_0)
    grpc_max_connection_age_s: float = setting(
        0.0, "a gRPC connection older than this is asked to reconnect (spreads clients over "
        "replicas behind a TCP load balancer); 0 = never", group="server", **_TIMEOUT_OR_0)
    grpc_max_connection_age_grace_s: float = setting(
        30.0, "calls still running on a connection past its age get this long before it is "
        "closed", group="server", **_TIMEOUT_OR_0)
    grpc_handshake_timeout_s: float = setting(
        10.0, "a gRPC connection must finish its TLS and HTTP/2 handshake within this many "
        "seconds", group="server", **_TIMEOUT)
    grpc_max_connections: int = setting(
        512, "gRPC connections open at once; more are closed as they are accepted; "
        "0 = no limit", group="server", **_NON_NEGATIVE)
    shutdown_grace_s: float = setting(10.0, "seconds in-flight calls get to finish on SIGTERM",
                                      group="server")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR", group="server")
    log_format: str = setting("text", "text, or json for one JSON object per line",
                              group="server", choices=LogFormat)

    # -- HTTP door
    http_host: str = setting(
        "127.0.0.1", "address of the HTTP door (Connect/gRPC-Web/JSON API and the search "
        "page); TLS settings apply to it too", group="http")
    http_port: int = setting(8080, "port of the HTTP door; 0 = off", group="http",
                             minimum=0, maximum=65535, note="0 = off")
    http_header_timeout_s: float = setting(
        10.0, "a request head must arrive whole within this many seconds of the connection "
        "opening or of the previous response, or the connection is closed (408)",
        group="http", **_TIMEOUT)
    http_body_timeout_s: float = setting(
        60.0, "a request body must arrive whole within this many seconds of its head, or the "
        "connection is closed (408)", group="http", **_TIMEOUT)
    http_max_connections: int = setting(
        512, "HTTP connections open at once; more are answered 503 and closed; 0 = no limit",
        group="http", **_NON_NEGATIVE)
    max_json_bytes: int = setting(
        8 * 1024 * 1024, "largest JSON request body the HTTP door reads, bytes (JSON costs far "
        "more to parse than binary protobuf, which --max-message-bytes bounds)",
        group="http", **_AT_LEAST_1)
    allowed_hosts: tuple[str, ...] = setting(
        (), "with authentication off, the HTTP door answers only Host values naming its "
        "address or localhost (against DNS rebinding): comma-separated further host names to "
        "answer, and whose pages may call the API; * for any", group="http")

    # -- model
    model: str = setting(DEFAULT_MODEL, "open_clip architecture name, e.g. ViT-B-32, ViT-L-14",
                         group="model")
    pretrained: str | None = setting(
        DEFAULT_PRETRAINED, "open_clip pretrained tag, downloaded on first use",
        group="model", type=str, exclusive="weights",
        shown=f"{DEFAULT_PRETRAINED} for {DEFAULT_MODEL}, else the catalog's choice")
    checkpoint: Path | None = setting(
        None, "local open_clip checkpoint file (.pt, .bin or .safetensors); works offline",
        group="model", type=Path, exclusive="weights")
    random_weights: bool = setting(
        False, "random weights: for trying the API and benchmarking only, search results are "
        "meaningless", group="model", exclusive="weights")
    model_config_dir: Path | None = setting(
        None, "extra folder of open_clip model config JSON files", group="model", type=Path)
    cache_dir: Path | None = setting(None, "where downloaded weights are cached",
                                     group="model", type=Path)
    device: str = setting("auto", "auto (cuda when present, else cpu), cpu, cuda or cuda:N",
                          group="model")
    precision: str = setting(
        "auto", "auto (bf16 where the GPU or CPU computes it natively, fp16 on older GPUs, "
        "else fp32), fp32 (exact parity with open_clip), fp16 (GPU only), bf16, or int8 "
        "(ONNX Runtime on the CPU, opt-in: see README for its measured tolerance)",
        group="model", choices=Precision)
    backend: str = setting(
        "auto", "what runs the towers: torch, onnx (ONNX Runtime on the CPU, exported from "
        "the same model once and cached under <data-dir>/onnx), or auto: torch on a GPU, on a "
        "CPU with native bf16 and for an explicit --precision fp32, else ONNX Runtime fp32 "
        "(measured about 2x torch fp32)",
        group="model", choices=Backend)
    channels_last: str = setting(
        "auto", "image tower in channels-last memory format: auto (on for cuda), on or off",
        group="model", choices=OnOff)
    compile: bool = setting(
        False, "torch.compile the towers: slower start, faster steady state", group="model")
    jpeg_draft: bool = setting(
        True, "decode large JPEGs at a reduced scale (within a tested tolerance of the full "
        "decode); --no-jpeg-draft for open_clip's exact preprocessing",
        group="model", negatable=True)
    device_decode: str = setting(
        "auto", "decode JPEGs and resize them on the model's device (nvjpeg): auto = on with "
        "CUDA, on, off; other formats always decode on the CPU", group="model", choices=OnOff)
    decode_threads: int = setting(4, "threads decoding images", group="model", **_AT_LEAST_1)
    batch_wait_ms: float = setting(
        2.0, "how long a model batch that is not full waits for inputs from other calls",
        group="model", **_NON_NEGATIVE)
    max_model_call_ms: float = setting(
        100.0, "on towers that cannot pause mid-call for a search (not a ViT image tower under "
        "torch), bulk calls are kept within this long when a measured batch size allows; "
        "0 = whole batches",
        group="model", **_NON_NEGATIVE)
    text_cache_size: int = setting(
        4096, "recent query texts whose embeddings are kept; 0 = no cache",
        group="model", **_NON_NEGATIVE)

    # -- limits
    max_message_bytes: int = setting(
        64 * 1024 * 1024, "largest request accepted and largest reply built, bytes (replies "
        "past it are refused with RESOURCE_EXHAUSTED, or cut into pages for listings)",
        group="limits", **_AT_LEAST_1)
    max_batch_size: int = setting(64, "most inputs in one model call", group="limits",
                                  **_AT_LEAST_1)
    max_items_per_request: int = setting(4096, "most texts, images or items in one request",
                                         group="limits", **_AT_LEAST_1)
    max_k: int = setting(1000, "largest k a search accepts", group="limits", **_AT_LEAST_1)
    max_ef: int = setting(4096, "largest ef a search may ask for", group="limits",
                          **_AT_LEAST_1)
    max_image_pixels: int = setting(
        40_000_000, "images with more pixels are refused (decompression-bomb guard)",
        group="limits", **_AT_LEAST_1)
    max_concurrent_rpcs: int = setting(
        64, "calls served at once; more are refused with RESOURCE_EXHAUSTED (bounds memory)",
        group="limits", **_AT_LEAST_1)
    max_heavy_calls: int = setting(
        4, "FindDuplicates, Cluster, Recommend and Classify calls running at once, in a pool "
        "of their own at low CPU priority; more are refused with RESOURCE_EXHAUSTED",
        group="limits", **_AT_LEAST_1)
    max_heavy_calls_per_caller: int = setting(
        2, "of those, how many one token (or, without authentication, one client address) "
        "may run at once", group="limits", **_AT_LEAST_1)
    max_duplicates_work: int = setting(
        1 << 26, "FindDuplicates calls whose items x max(ef, neighbors + 1) exceed this are "
        "refused up front with RESOURCE_EXHAUSTED", group="limits", **_AT_LEAST_1)
    max_cluster_work: int = setting(
        1 << 27, "Cluster calls whose items x n_clusters exceed this are refused up front "
        "with RESOURCE_EXHAUSTED", group="limits", **_AT_LEAST_1)
    max_open_streams: int = setting(
        16, "health Watch and reflection streams (which need no token) open at once, apart "
        "from --max-concurrent-rpcs; more are refused with RESOURCE_EXHAUSTED",
        group="limits", **_AT_LEAST_1)
    max_decoded_bytes: int = setting(
        1 << 30, "decoded image tensors held at once across all requests, in bytes; calls "
        "that wait past 10 s for room are refused with RESOURCE_EXHAUSTED",
        group="limits", **_AT_LEAST_1)
    max_queued_batches: int = setting(
        64, "model batches waiting at once; more are refused with RESOURCE_EXHAUSTED",
        group="limits", **_AT_LEAST_1)

    # -- index
    data_dir: Path = setting(Path("data"), "folder holding the collections", group="index")
    default_ef: int = setting(64, "HNSW ef of a search that does not set one", group="index",
                              **_AT_LEAST_1)
    default_ef_text: int = setting(
        192, "HNSW ef of a text query that does not set one: text embeddings sit apart from "
        "image embeddings (the modality gap) and need a longer candidate list for the same "
        "recall", group="index", **_AT_LEAST_1)
    hnsw_m: int = setting(16, "HNSW links per node for new collections", group="index",
                          **_AT_LEAST_1)
    hnsw_ef_construction: int = setting(
        200, "HNSW build-time candidate list for new collections", group="index",
        **_AT_LEAST_1)
    snapshot_interval_s: float = setting(
        60.0, "seconds between background index snapshots of changed collections",
        group="index")
    # With the drain (10 s), shutdown stays well inside Kubernetes' default 30 s grace period.
    shutdown_snapshot_s: float = setting(
        5.0, "seconds that saving changed indexes may take at shutdown, most changed first; "
        "the rest are replayed from the store at the next start (nothing is lost)",
        group="index", **_NON_NEGATIVE)

    # -- engines
    encoder: str = setting(
        "local", "local: the model runs in this process; ray: a Ray Serve deployment of the "
        "encoder (deploy/ray/serve.yaml), called through Serve handles",
        group="engines", choices=EncoderKind)
    ray_address: str = setting(
        "auto", "Ray cluster to join with --encoder ray: auto (the local one), "
        "ray://host:10001, or host:6379", group="engines")
    ray_app: str = setting("clipsearch-encoder",
                           "name of the Serve application holding the encoder", group="engines")
    ray_max_in_flight: int = setting(
        64, "encoder calls this front keeps in flight to Ray at once", group="engines",
        **_AT_LEAST_1)
    store: str = setting(
        "local", "local: SQLite + hnswlib under --data-dir; milvus: one Milvus collection per "
        "clipsearch collection, at --store-uri", group="engines", choices=StoreKind)
    store_uri: str = setting(
        "", "with --store milvus: a Milvus Lite file (by default <data-dir>/milvus.db) or a "
        "Milvus server, http://host:19530", group="engines")
    store_token: str = setting(
        "", "with --store milvus: the Milvus token (user:password or an API key); prefer the "
        "environment variable", group="engines")

    @property
    def weights_source(self) -> str:
        """The one place weights come from, for messages and server info."""
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint}"
        if self.random_weights:
            return "random weights"
        return f"pretrained tag {self.pretrained}"

    def only(self, *groups: str) -> SettingsView:
        """This part's share of the settings: the fields of `groups`, and nothing else."""
        return SettingsView(self, groups)


# Derived values: the groups a property reads from.
_PROPERTY_GROUPS = {"weights_source": ("model",)}


class SettingsView:
    """Read-only settings limited to some groups, so each part of the server sees its own.

    The encoder gets the model's settings, the store the index's, a door its own; reading
    another group's field raises AttributeError naming the group, so a part that quietly
    starts depending on someone else's setting fails its tests instead.
    """

    __slots__ = ("_settings", "groups")

    def __init__(self, settings: Settings, groups: tuple[str, ...]) -> None:
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"unknown setting groups: {', '.join(unknown)}")
        self._settings = settings
        self.groups = groups

    def __getattr__(self, name: str) -> Any:
        wanted = _PROPERTY_GROUPS.get(name) or (group_of(name),)
        missing = [g for g in wanted if g not in self.groups]
        if missing:
            raise AttributeError(f"{name} is a {missing[0]!r} setting; this part receives "
                                 f"only {', '.join(self.groups)}")
        return getattr(self._settings, name)

    def __repr__(self) -> str:
        return f"SettingsView({', '.join(self.groups)})"


# What a part of the server accepts: its share (the running server) or all (tests, tools).
AnySettings = Settings | SettingsView


def group_of(name: str) -> str:
    """The argument group a setting is declared in (AttributeError for no such setting)."""
    spec = Settings.__dataclass_fields__.get(name)
    if spec is None:
        raise AttributeError(f"no setting named {name!r}")
    return str(spec.metadata["group"])


def flag_of(name: str) -> str:
    """The command-line flag of a setting: max_k -> --max-k."""
    return "--" + name.replace("_", "-")


def env_of(name: str) -> str:
    """The environment variable of a setting: max_k -> CLIPSEARCH_MAX_K."""
    return f"CLIPSEARCH_{name.upper()}"
