"""The search command, and the ranked table of hits that it and recommend print."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from clipsearch.cli.options import add_collection_option, non_empty, positive_int
from clipsearch.client import Client


def add_commands(commands: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    search = commands.add_parser("search", parents=[parent], help="search a collection",
                                 description="Search by TEXT, --image or --id (exactly one).")
    search.add_argument("text", nargs="?", type=non_empty, metavar="TEXT", help="a text query")
    add_collection_option(search, "collection to search")
    search.add_argument("--image", metavar="PATH", help="an image query")
    search.add_argument("--id", metavar="ID", help="find items like this stored one")
    search.add_argument("-k", type=positive_int, default=10, help="hits wanted (default: 10)")
    search.add_argument("--ef", type=int, default=0, help="HNSW ef (default: server's)")
    search.set_defaults(run=_search, check=_check)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors that argparse cannot see, found before connecting."""
    given = sum(q is not None for q in (args.text, args.image, args.id))
    if given != 1:
        parser.error("search needs exactly one query: TEXT, --image PATH or --id ID")
    if args.image is not None and not Path(args.image).is_file():
        parser.error(f"--image {args.image}: no such file")


def _search(client: Client, args: argparse.Namespace) -> int:
    query: dict[str, Any] = {}
    if args.text is not None:
        query["text"] = args.text
    if args.image is not None:
        query["image"] = args.image
    if args.id is not None:
        query["id"] = args.id
    print_hits(client.search(args.collection, k=args.k, ef=args.ef, **query))
    return 0


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
