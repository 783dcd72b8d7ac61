"""The CLI's connection options, early argument checks, and the item verbs.

Connection options (--server, --token, --timeout, TLS) are registered on the top-level parser
and again on every subcommand, so they work before or after it. The item verbs (drop, delete,
get, count) print plain, parseable output and exit 0 on success, 1 when the server refused or
something asked for was not there, 2 on a usage error: scripts can branch on the status.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

from clipsearch.client import DEFAULT_TARGET, Client

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


def connection_refused(details: str) -> bool:
    """True for gRPC's message when nothing answered at the address."""
    lowered = details.lower()
    return "failed to connect" in lowered or "connection refused" in lowered


def add_item_commands(commands: argparse._SubParsersAction,
                      parent: argparse.ArgumentParser) -> None:
    """The drop, delete, get and count subcommands."""
    drop = commands.add_parser("drop", parents=[parent], help="delete a whole collection",
                               description="Delete a collection and all its items.")
    drop.add_argument("--collection", required=True, type=collection_name, metavar="NAME",
                      help="the collection to drop")
    drop.add_argument("--missing-ok", action="store_true",
                      help="exit 0 when the collection does not exist")

    delete = commands.add_parser("delete", parents=[parent], help="delete items by id",
                                 description="Delete items by id; prints how many existed.")
    delete.add_argument("ids", nargs="+", type=non_empty, metavar="ID", help="item ids")
    delete.add_argument("--collection", required=True, type=collection_name, metavar="NAME",
                        help="the collection to delete from")

    get = commands.add_parser(
        "get", parents=[parent], help="print items by id, one JSON object per line",
        description="Print stored items as JSON lines ({\"id\", \"metadata\"}); exits 1 when "
        "any id is not stored.")
    get.add_argument("ids", nargs="+", type=non_empty, metavar="ID", help="item ids")
    get.add_argument("--collection", required=True, type=collection_name, metavar="NAME",
                     help="the collection to read")
    get.add_argument("--vectors", action="store_true", help="include each item's vector")

    count = commands.add_parser("count", parents=[parent], help="print a collection's size",
                                description="Print how many items a collection holds (or "
                                "how many match --filter).")
    count.add_argument("--collection", required=True, type=collection_name, metavar="NAME",
                       help="the collection to count")
    count.add_argument("--filter", type=_json_object, metavar="JSON",
                       help='a metadata filter, e.g. \'{"album": "2024"}\'')


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def drop(client: Client, args: argparse.Namespace) -> int:
    if client.drop_collection(args.collection):
        print(f"dropped {args.collection!r}")
        return 0
    print(f"collection {args.collection!r} does not exist", file=sys.stderr)
    return 0 if args.missing_ok else 1


def delete(client: Client, args: argparse.Namespace) -> int:
    removed = client.delete(args.collection, args.ids)
    print(f"deleted {removed} of {len(set(args.ids))} ids")
    return 0


def get(client: Client, args: argparse.Namespace) -> int:
    records = client.get(args.collection, args.ids, include_vectors=args.vectors)
    for record in records:
        row: dict[str, Any] = {"id": record.id, "metadata": record.metadata}
        if args.vectors and record.vector is not None:
            row["vector"] = [float(x) for x in record.vector]
        print(json.dumps(row, ensure_ascii=False, default=str))
    missing = [i for i in dict.fromkeys(args.ids) if i not in {r.id for r in records}]
    for id_ in missing:
        print(f"not found: {id_}", file=sys.stderr)
    return 1 if missing else 0


def count(client: Client, args: argparse.Namespace) -> int:
    print(client.count(args.collection, filter=args.filter))
    return 0


ITEM_COMMANDS = {"drop": drop, "delete": delete, "get": get, "count": count}


def print_hits(hits: list[Any]) -> None:
    """A ranked table of hits: rank, score, id and metadata as compact JSON."""
    if not hits:
        print("no hits")
        return
    id_width = max(2, *(len(h.id) for h in hits))
    rank_width = max(4, len(str(len(hits))))
    print(f"{'rank':>{rank_width}}  {'score':>7}  {'id':<{id_width}}  metadata")
    for rank, hit in enumerate(hits, 1):
        meta = json.dumps(hit.metadata, separators=(",", ":"), ensure_ascii=False)
        print(f"{rank:>{rank_width}}  {hit.score:>7.4f}  {hit.id:<{id_width}}  {meta}")
