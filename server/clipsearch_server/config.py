"""Server settings: command-line flags, each with a CLIPSEARCH_* environment fallback.

Precedence is flag > environment > default, so a container can be configured by environment
and a person can still override one thing on the command line. Each setting is declared once,
as a field of `Settings` (settings.py); the parser, the environment reading and the checks of
choices and ranges are built from those declarations here. `validate()` adds the checks that
span settings or look at the disk.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import Field, fields
from typing import Any

from .catalog import default_pretrained
from .settings import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    GROUPS,
    MAX_TIMEOUT_S,
    Settings,
    env_of,
    flag_of,
)

__all__ = ["DEFAULT_MODEL", "DEFAULT_PRETRAINED", "MAX_TIMEOUT_S", "Settings", "build_parser",
           "parse_settings", "validate"]

_TRUE = ("1", "true", "yes", "on")


def _env(name: str) -> str | None:
    value = os.environ.get(env_of(name))
    return value if value not in (None, "") else None


def _add(group: argparse._ActionsContainer, f: Field[Any]) -> None:
    """Add one declared setting's flag, its default taken from the environment when set."""
    m = f.metadata
    env = _env(f.name)
    if m["type"] is bool:
        default = f.default if env is None else env.lower() in _TRUE
        action: Any = argparse.BooleanOptionalAction if m["negatable"] else "store_true"
        group.add_argument(flag_of(f.name), action=action, default=default,
                           help=f"{m['help']} (env {env_of(f.name)})")
        return
    if m["shown"] is not None:  # the real default is worked out later (parse_settings)
        default, shown = env, f"default: {m['shown']}; "
    else:
        # A string from the environment is parsed by `type`, as a flag's text would be.
        default = env if env is not None else f.default
        shown = "" if f.default in (None, "", ()) else "default: %(default)s; "
    group.add_argument(flag_of(f.name), type=m["type"], default=default,
                       help=f"{m['help']} ({shown}env {env_of(f.name)})")


def build_parser() -> argparse.ArgumentParser:
    """The `clipsearch serve` flags; every default can also come from CLIPSEARCH_<FLAG>."""
    p = argparse.ArgumentParser(
        prog="clipsearch serve",
        usage="%(prog)s [options]",  # a usage error is two lines, not the 40 of every flag
        description="Serve CLIP embeddings and HNSW search over gRPC. Every flag can also be "
        "set as an environment variable CLIPSEARCH_<FLAG> (e.g. CLIPSEARCH_DATA_DIR).",
    )
    groups = {key: p.add_argument_group(title, description)
              for key, (title, description) in GROUPS.items()}
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(Settings):
        group: argparse._ActionsContainer = groups[f.metadata["group"]]
        if f.metadata["exclusive"]:
            key = f.metadata["exclusive"]
            if key not in exclusive:
                exclusive[key] = groups[f.metadata["group"]].add_mutually_exclusive_group()
            group = exclusive[key]
        _add(group, f)
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


def _either(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def _declared_problem(s: Settings, f: Field[Any]) -> str | None:
    """What breaks a setting's declared choices or range, as a sentence, or None."""
    m, value, flag = f.metadata, getattr(s, f.name), flag_of(f.name)
    if m["choices"] and value not in m["choices"]:
        return f"{flag} must be {_either(m['choices'])}, not {value!r}"
    low, high, above = m["minimum"], m["maximum"], m["above"]
    if above is not None:
        if not (value > above and (high is None or value <= high)):
            return f"{flag} must be more than {above} and at most {high}"
    elif low is not None and high is not None:
        if not low <= value <= high:
            note = f" ({m['note']})" if m["note"] else ""
            return f"{flag} must be {low}..{high}{note}, not {value}"
    elif low is not None and value < low:
        return f"{flag} cannot be negative" if low == 0 else f"{flag} must be at least {low}"
    return None


def validate(s: Settings) -> str | None:
    """The first thing wrong with the settings, as a sentence, or None."""
    if s.device != "auto" and s.device != "cpu" and not s.device.startswith("cuda"):
        return f"--device must be auto, cpu, cuda or cuda:N, not {s.device!r}"
    for f in fields(Settings):
        problem = _declared_problem(s, f)
        if problem:
            return problem
    if s.precision == "int8" and s.backend == "torch":
        return "--precision int8 runs on ONNX Runtime: use --backend onnx (or auto)"
    if s.backend == "onnx" and s.precision in ("fp16", "bf16"):
        return f"--backend onnx runs fp32 or int8, not {s.precision}"
    if s.store_uri and s.store != "milvus":
        return "--store-uri goes with --store milvus"
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
