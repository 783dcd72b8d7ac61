"""The index command: every image under a folder, found by content, embedded and stored."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipsearch.cli.options import add_collection_option, positive_int
from clipsearch.client import Client
from clipsearch.errors import BatchError
from clipsearch.images import discover_images


def add_commands(commands: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    index = commands.add_parser(
        "index", parents=[parent], help="embed and store every image under a folder",
        description="Embed every image under DIR (found by content, not extension) into a "
        "collection; ids are the paths relative to DIR. Exits 1 when any file failed or none "
        "was found; the summary line is printed either way.")
    index.add_argument("dir", metavar="DIR", help="folder to walk, recursively")
    add_collection_option(index, "collection to write to (created on first write)")
    index.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                       help="images per request (default: 32)")
    index.add_argument("--thumbnail-size", type=int, default=None, metavar="PX",
                       help="long side of the thumbnails a new collection keeps for the search "
                       "page (default: the server's, 256; 0 = none)")
    index.add_argument("-v", "--verbose", action="store_true", help="name the skipped files")
    index.set_defaults(run=_index, check=_check)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not Path(args.dir).is_dir():
        parser.error(f"not a directory: {args.dir}")


def _index(client: Client, args: argparse.Namespace) -> int:
    root = Path(args.dir)
    found = discover_images(root)
    if found.not_images:
        print(f"skipping {len(found.not_images)} files that are not images", file=sys.stderr)
        if args.verbose:
            for rel in found.not_images:
                print(f"  not an image: {rel}", file=sys.stderr)
    for rel, why in found.unreadable:
        print(f"failed: {rel}: cannot read: {why}", file=sys.stderr)

    failed = len(found.unreadable)
    indexed = 0
    if not found.images:
        print(f"no images found in {root}", file=sys.stderr)
    else:
        if args.thumbnail_size is not None and args.collection not in {
                c.name for c in client.collections()}:
            client.create_collection(args.collection, thumbnail_size=args.thumbnail_size)
        try:
            indexed = client.upsert(
                args.collection,
                ids=found.images,
                images=[root / rel for rel in found.images],
                metadata=[{"path": rel} for rel in found.images],
                progress=True,
            )
        except BatchError as exc:
            indexed = exc.upserted or 0
            failed += len(exc.errors)
            for error in exc.errors:
                rel = found.images[error.index]
                print(f"failed: {rel}: {error.code.name}: {error.message}", file=sys.stderr)
    print(
        f"indexed {indexed}, skipped {len(found.not_images)} not images, failed {failed}"
        f" (collection {args.collection!r})"
    )
    return 0 if found.images and failed == 0 else 1
