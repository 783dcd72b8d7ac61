"""The settings declarations (clipsearch_server/settings.py) against the parser, the
environment, the generic checks and README's configuration tables. No server process."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from clipsearch_server.config import Settings, build_parser, parse_settings, validate
from clipsearch_server.settings import GROUPS, MAX_TIMEOUT_S, env_of, flag_of

# README's configuration tables, by their header rows; the first cell names the flags.
SERVER = Path(__file__).resolve().parents[2] / "server" / "clipsearch_server"
TABLE_HEADERS = ("| flag | default | meaning |", "| setting | values | what it chooses |")


def _readme() -> Path:
    here = Path(__file__).resolve()
    return next(p / "README.md" for p in here.parents if (p / "README.md").is_file())


def readme_flags() -> set[str]:
    """Every `--flag` named in the first column of README's configuration tables."""
    lines = _readme().read_text().splitlines()
    found: set[str] = set()
    for header in TABLE_HEADERS:
        start = lines.index(header)  # ValueError: the table's header row changed
        for line in lines[start + 2:]:
            if not line.startswith("|"):
                break
            first = line.split("|")[1]
            found.update(re.findall(r"`(--[a-z0-9-]+)`", first))
    return found


def declared_flags() -> set[str]:
    flags = {flag_of(f.name) for f in fields(Settings)}
    flags |= {"--no-" + flag_of(f.name)[2:] for f in fields(Settings) if f.metadata["negatable"]}
    return flags


def test_readme_table_names_every_declared_flag() -> None:
    missing = declared_flags() - readme_flags()
    assert not missing, f"declared but not in README's configuration table: {sorted(missing)}"


def test_readme_table_names_only_declared_flags() -> None:
    unknown = readme_flags() - declared_flags()
    assert not unknown, f"in README's configuration table but not declared: {sorted(unknown)}"


def test_parser_has_every_declared_flag_in_its_group() -> None:
    parser = build_parser()
    titles = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
    for f in fields(Settings):
        assert f.name in titles[GROUPS[f.metadata["group"]][0]], f.name
        assert f.metadata["help"], f.name
    assert "server and TLS" in parser.format_help()


def test_flag_beats_environment_beats_default(clean_env: pytest.MonkeyPatch) -> None:
    assert parse_settings([]).max_k == 1000
    clean_env.setenv("CLIPSEARCH_MAX_K", "7")
    clean_env.setenv("CLIPSEARCH_ALLOWED_HOSTS", "A.example, b.example")
    clean_env.setenv("CLIPSEARCH_JPEG_DRAFT", "off")
    clean_env.setenv("CLIPSEARCH_COMPILE", "yes")
    clean_env.setenv("CLIPSEARCH_CHECKPOINT", "")  # empty means unset
    s = parse_settings([])
    assert (s.max_k, s.allowed_hosts, s.jpeg_draft, s.compile) == (
        7, ("a.example", "b.example"), False, True)
    s = parse_settings(["--max-k", "9", "--jpeg-draft", "--allowed-hosts", "*"])
    assert (s.max_k, s.allowed_hosts, s.jpeg_draft) == (9, ("*",), True)


def test_every_setting_has_its_environment_name(clean_env: pytest.MonkeyPatch) -> None:
    help_text = " ".join(build_parser().format_help().split())
    for f in fields(Settings):
        assert env_of(f.name) in help_text, f.name


def test_bad_environment_number_is_a_usage_error(
        clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    clean_env.setenv("CLIPSEARCH_PORT", "many")
    with pytest.raises(SystemExit) as info:
        parse_settings([])
    assert info.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_weights_flags_exclude_each_other(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--random-weights", "--pretrained", "openai"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"precision": "fp8"}, "--precision must be auto, fp32, fp16, bf16 or int8, not 'fp8'"),
        ({"device_decode": "maybe"}, "--device-decode must be auto, on or off, not 'maybe'"),
        ({"backend": "tvm"}, "--backend must be auto, torch or onnx, not 'tvm'"),
        ({"precision": "int8", "backend": "torch"},
         "--precision int8 runs on ONNX Runtime: use --backend onnx (or auto)"),
        ({"precision": "bf16", "backend": "onnx"}, "--backend onnx runs fp32 or int8, not bf16"),
        ({"channels_last": "x"}, "--channels-last must be auto, on or off, not 'x'"),
        ({"log_format": "xml"}, "--log-format must be text or json, not 'xml'"),
        ({"encoder": "gpu"}, "--encoder must be local or ray, not 'gpu'"),
        ({"store": "pg"}, "--store must be local or milvus, not 'pg'"),
        ({"max_k": 0}, "--max-k must be at least 1"),
        ({"ray_max_in_flight": 0}, "--ray-max-in-flight must be at least 1"),
        ({"port": 70000}, "--port must be 0..65535, not 70000"),
        ({"http_port": -1}, "--http-port must be 0..65535 (0 = off), not -1"),
        ({"text_cache_size": -1}, "--text-cache-size cannot be negative"),
        ({"http_max_connections": -1}, "--http-max-connections cannot be negative"),
        ({"http_body_timeout_s": 0},
         f"--http-body-timeout-s must be more than 0 and at most {MAX_TIMEOUT_S}"),
        ({"grpc_max_connection_age_s": -1},
         f"--grpc-max-connection-age-s must be 0..{MAX_TIMEOUT_S}, not -1"),
        ({"store_uri": "x.db"}, "--store-uri goes with --store milvus"),
        ({"tls_cert": Path("c.pem")}, "--tls-cert and --tls-key go together"),
    ],
)
def test_validate_messages(changes: dict, message: str) -> None:
    assert validate(Settings(**changes)) == message


def test_defaults_are_valid() -> None:
    assert validate(Settings()) is None


def test_a_view_gives_its_groups_and_refuses_the_rest() -> None:
    view = Settings(max_k=7, hnsw_m=24).only("limits", "model")
    assert view.max_k == 7
    assert view.weights_source.startswith("pretrained tag")  # a property of the model group
    with pytest.raises(AttributeError, match="hnsw_m is a 'index' setting"):
        _ = view.hnsw_m
    with pytest.raises(AttributeError, match="no setting named"):
        _ = view.no_such_setting
    with pytest.raises(ValueError, match="unknown setting groups: nope"):
        Settings().only("nope")


# The modules each share of app.py is handed to, and the names they call it by.
_PARTS = {
    "ENCODER": ["encoders/__init__.py", "encoders/local/encoder.py", "encoders/local/model.py",
                "encoders/local/backend.py", "encoders/ray_serve.py"],
    "STORE": ["stores/__init__.py"],
    "SERVICER": ["service.py", "analysis_rpcs.py"],
    "HTTP_APP": ["doors/http_server.py:HttpApp"],
    "HTTP_DOOR": ["doors/http_server.py:HttpServer", "doors/http_limits.py:HttpLimits"],
    "GRPC_DOOR": ["doors/http_limits.py:grpc_connection_options"],
}


def _settings_read(source: str) -> set[str]:
    """The setting names a piece of code reads, as settings.X, self.settings.X or s.X."""
    return set(re.findall(r"\b(?:settings|s)\.([a-z_][a-z0-9_]*)\b", source))


def _part_source(spec: str) -> str:
    path, _, name = spec.partition(":")
    source = (SERVER / path).read_text()
    if not name:
        return source
    start = re.search(rf"^(class|def) {name}\b", source, re.M)
    assert start, spec
    end = re.search(r"^(class|def) ", source[start.end():], re.M)
    return source[start.start():start.end() + end.start() if end else None]


@pytest.mark.parametrize("share", sorted(_PARTS))
def test_each_part_reads_only_the_groups_it_receives(share: str) -> None:
    from clipsearch_server import app
    from clipsearch_server.settings import _PROPERTY_GROUPS, group_of

    groups = set(getattr(app, share))
    declared = {f.name for f in fields(Settings)} | set(_PROPERTY_GROUPS)
    for spec in _PARTS[share]:
        for name in _settings_read(_part_source(spec)) & declared:
            needs = set(_PROPERTY_GROUPS.get(name, (group_of(name),)))
            assert needs <= groups, f"{spec} reads {name} ({needs}) but gets only {groups}"
