"""What every command shares: the connection options and the argument types checked early.

Connection options (--server, --token, --timeout, TLS) are registered on the top-level parser
and again on every subcommand, so they work before or after it.
"""

from __future__ import annotations

import argparse
import os
import re

from clipsearch.client import DEFAULT_TARGET

SERVER_ENV = "CLIPSEARCH_SERVER"
# The bearer token should come from the environment: a flag shows in `ps`.
TOKEN_ENV = "CLIPSEARCH_TOKEN"
# The server's rule for collection names, checked here before any work starts.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
OPTIONS_WITH_VALUE = ("--server", "--token", "--timeout", "--tls-ca", "--tls-cert", "--tls-key")
CONNECT_HINT = "is the server running at {server}? (--server or CLIPSEARCH_SERVER)"


def add_connection_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Connection options; on subcommands their default is 'not given', so a value given
    before the subcommand is kept unless repeated after it."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("connection (before or after the command)")
    group.add_argument("--server", metavar="HOST:PORT",
                       default=default(os.environ.get(SERVER_ENV) or DEFAULT_TARGET),
                       help=f"server address (default: ${SERVER_ENV} or {DEFAULT_TARGET})")
    group.add_argument("--token", metavar="TOKEN", default=default(None),
                       help=f"bearer token; prefer ${TOKEN_ENV}, since a flag shows in `ps`")
    group.add_argument("--timeout", type=float, default=default(60.0), metavar="SECONDS",
                       help="seconds per call (default: 60)")
    group.add_argument("--tls", action="store_true", default=default(False),
                       help="connect over TLS")
    group.add_argument("--tls-ca", metavar="PEM", default=default(None),
                       help="CA to check the server's certificate against")
    group.add_argument("--tls-cert", metavar="PEM", default=default(None),
                       help="client certificate (mutual TLS)")
    group.add_argument("--tls-key", metavar="PEM", default=default(None),
                       help="client private key (mutual TLS)")


def connection_refused(details: str) -> bool:
    """True for gRPC's message when nothing answered at the address."""
    lowered = details.lower()
    return "failed to connect" in lowered or "connection refused" in lowered


def add_collection_option(parser: argparse.ArgumentParser, help: str, *,
                          checked: bool = True) -> None:
    """The required --collection NAME; ``checked``: its name is checked before connecting."""
    parser.add_argument("--collection", required=True, type=collection_name if checked else str,
                        metavar="NAME", help=help)


def collection_name(text: str) -> str:
    """argparse type: a collection name the server will accept."""
    if not NAME_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a valid collection name: 1 to 64 letters, digits, '_', '-' or "
            "'.', starting with a letter or digit")
    return text


def non_empty(text: str) -> str:
    """argparse type: a text that is not blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
