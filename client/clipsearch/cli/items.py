"""The item verbs: drop, delete, get and count.

They print plain, parseable output and exit 0 on success, 1 when the server refused or
something asked for was not there, 2 on a usage error: scripts can branch on the status.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from clipsearch.cli.options import add_collection_option, non_empty
from clipsearch.client import Client


def add_commands(commands: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """The drop, delete, get and count subcommands."""
    drop = commands.add_parser("drop", parents=[parent], help="delete a whole collection",
                               description="Delete a collection and all its items.")
    add_collection_option(drop, "the collection to drop")
    drop.add_argument("--missing-ok", action="store_true",
                      help="exit 0 when the collection does not exist")
    drop.set_defaults(run=_drop)

    delete = commands.add_parser("delete", parents=[parent], help="delete items by id",
                                 description="Delete items by id; prints how many existed.")
    delete.add_argument("ids", nargs="+", type=non_empty, metavar="ID", help="item ids")
    add_collection_option(delete, "the collection to delete from")
    delete.set_defaults(run=_delete)

    get = commands.add_parser(
        "get", parents=[parent], help="print items by id, one JSON object per line",
        description="Print stored items as JSON lines ({\"id\", \"metadata\"}); exits 1 when "
        "any id is not stored.")
    get.add_argument("ids", nargs="+", type=non_empty, metavar="ID", help="item ids")
    add_collection_option(get, "the collection to read")
    get.add_argument("--vectors", action="store_true", help="include each item's vector")
    get.set_defaults(run=_get)

    count = commands.add_parser("count", parents=[parent], help="print a collection's size",
                                description="Print how many items a collection holds (or "
                                "how many match --filter).")
    add_collection_option(count, "the collection to count")
    count.add_argument("--filter", type=_json_object, metavar="JSON",
                       help='a metadata filter, e.g. \'{"album": "2024"}\'')
    count.set_defaults(run=_count)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _drop(client: Client, args: argparse.Namespace) -> int:
    if client.drop_collection(args.collection):
        print(f"dropped {args.collection!r}")
        return 0
    print(f"collection {args.collection!r} does not exist", file=sys.stderr)
    return 0 if args.missing_ok else 1


def _delete(client: Client, args: argparse.Namespace) -> int:
    removed = client.delete(args.collection, args.ids)
    print(f"deleted {removed} of {len(set(args.ids))} ids")
    return 0


def _get(client: Client, args: argparse.Namespace) -> int:
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


def _count(client: Client, args: argparse.Namespace) -> int:
    print(client.count(args.collection, filter=args.filter))
    return 0
