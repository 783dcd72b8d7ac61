"""What there is to look at: the server and its model, its collections, this client's version."""

from __future__ import annotations

import argparse
from dataclasses import fields
from importlib.metadata import PackageNotFoundError, version

import clipsearch
from clipsearch.client import Client


def add_commands(commands: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    info = commands.add_parser("info", parents=[parent], help="describe the server and its model")
    info.set_defaults(run=_info)
    listing = commands.add_parser("collections", parents=[parent], help="list collections")
    listing.set_defaults(run=_collections)


def client_version() -> str:
    """The installed package's version, or the one the source tree says when not installed."""
    try:
        return version("clipsearch")
    except PackageNotFoundError:
        return getattr(clipsearch, "__version__", "unknown")


def _info(client: Client, args: argparse.Namespace) -> int:
    info = client.info()
    names = [f.name for f in fields(info)]
    width = max(len(n) for n in names)
    print(f"{'server':<{width}}: {args.server}")
    for name in names:
        value = getattr(info, name)
        if isinstance(value, bool):
            value = "yes" if value else "no"
        print(f"{name:<{width}}: {value}")
    return 0


def _collections(client: Client, args: argparse.Namespace) -> int:
    rows = [("name", "count", "dim", "model fingerprint")]
    rows += [(c.name, str(c.count), str(c.dim), c.model_fingerprint) for c in client.collections()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for name, count, dim, fingerprint in rows:
        print(f"{name:<{widths[0]}}  {count:>{widths[1]}}  {dim:>{widths[2]}}  {fingerprint}")
    if len(rows) == 1:
        print("(no collections)")
    return 0
