"""The ``clipsearch`` command: serve, index a folder, search, and look at the server.

Everything except ``serve`` talks to a running server through the thin client, so this module
imports neither torch nor Pillow; ``serve`` imports the server only when asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import grpc

from clipsearch.cli_analysis import add_commands
from clipsearch.cli_verbs import (
    CONNECT_HINT,
    ITEM_COMMANDS,
    OPTIONS_WITH_VALUE,
    TOKEN_ENV,
    add_connection_options,
    add_item_commands,
    collection_name,
    connection_refused,
    non_empty,
    print_hits,
)
from clipsearch.client import BatchError, Client, ClipSearchError

# Enough bytes to recognize every supported format (BMP needs its DIB header size at 14..18).
SNIFF_BYTES = 18
# Sizes of the DIB headers that BMP files use (core, info, v2, v3, OS/2 v2, v4, v5).
_BMP_DIB_SIZES = {12, 40, 52, 56, 64, 108, 124}
_GLOBAL_OPTIONS_WITH_VALUE = OPTIONS_WITH_VALUE
# ISO base media brands of HEIC/HEIF and AVIF files (the `ftyp` box at bytes 4..12).
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_JXL_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"
STDOUT_CLOSED = 128 + 13  # the shell's status of a command killed by SIGPIPE


# --------------------------------------------------------------------------------------------
# Finding images (pure, so that it is tested without a server)


def sniff_image(head: bytes) -> str | None:
    """The image format that the first bytes of a file announce, or None.

    Magic bytes rather than extensions: a folder's names are not to be trusted, and the
    server accepts exactly these formats.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    # "BM" alone is too weak (any text may start with it): check the DIB header size too.
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "bmp"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "heif"
    if head[4:8] == b"ftyp" and head[8:12] in _AVIF_BRANDS:
        return "avif"
    if head.startswith((b"\xff\x0a", _JXL_CONTAINER)):
        return "jxl"
    return None


@dataclass
class Discovery:
    """What a folder holds: paths relative to it, in posix form, sorted."""

    images: list[str] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)
    # (relative path, why) for files and folders that could not be read.
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def discover_images(root: str | os.PathLike[str]) -> Discovery:
    """Walks ``root`` recursively and sorts its files into images and the rest.

    Symbolic links to folders are not followed (no loops); links to files are.
    """
    root = Path(root)
    found = Discovery()

    def on_error(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else root
        found.unreadable.append((_relative(where, root), exc.strerror or str(exc)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            rel = _relative(path, root)
            try:
                if not path.is_file():
                    continue  # sockets, fifos, broken links
                with path.open("rb") as f:
                    head = f.read(SNIFF_BYTES)
            except OSError as exc:
                found.unreadable.append((rel, exc.strerror or str(exc)))
                continue
            (found.images if sniff_image(head) else found.not_images).append(rel)
    found.images.sort()
    found.not_images.sort()
    found.unreadable.sort()
    return found


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# --------------------------------------------------------------------------------------------
# Commands


def _serve(args: list[str]) -> int:
    try:
        from clipsearch_server import launch
    except ImportError as exc:
        print("the server is not installed: pip install 'clipsearch[server]'", file=sys.stderr)
        print(f"  ({exc})", file=sys.stderr)
        return 2
    launch.check_settings(args)  # bad flags are refused before torch is imported
    launch.with_huge_pages(["serve", *args])  # may re-execute this command once (see launch.py)
    from clipsearch_server import app

    result = app.main(args)
    return int(result) if result is not None else 0


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


# --------------------------------------------------------------------------------------------
# Argument parsing


def _serve_args(argv: Sequence[str]) -> list[str] | None:
    """The arguments after ``serve`` when that is the command, else None.

    Found by hand because argparse would swallow ``serve --help`` instead of passing it on.
    """
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in _GLOBAL_OPTIONS_WITH_VALUE:
            i += 2
        elif token.startswith(tuple(f"{o}=" for o in _GLOBAL_OPTIONS_WITH_VALUE)):
            i += 1
        elif token == "serve":
            return list(argv[i + 1 :])
        else:
            return None
    return None


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (without ``serve``'s own options, which the server owns)."""
    parser = argparse.ArgumentParser(
        prog="clipsearch",
        description="CLIP text-to-image and image-to-image search. A server that wants a "
        f"bearer token gets it from ${TOKEN_ENV}.",
    )
    add_connection_options(parser, top=True)
    parent = argparse.ArgumentParser(add_help=False)
    add_connection_options(parent, top=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser(
        "serve", help="run the server (its options: clipsearch serve --help)", add_help=False
    )

    index = commands.add_parser(
        "index", parents=[parent], help="embed and store every image under a folder",
        description="Embed every image under DIR (found by content, not extension) into a "
        "collection; ids are the paths relative to DIR. Exits 1 when any file failed or none "
        "was found; the summary line is printed either way.")
    index.add_argument("dir", metavar="DIR", help="folder to walk, recursively")
    index.add_argument("--collection", required=True, type=collection_name, metavar="NAME",
                       help="collection to write to (created on first write)")
    index.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                       help="images per request (default: 32)")
    index.add_argument("--thumbnail-size", type=int, default=None, metavar="PX",
                       help="long side of the thumbnails a new collection keeps for the search "
                       "page (default: the server's, 256; 0 = none)")
    index.add_argument("-v", "--verbose", action="store_true", help="name the skipped files")

    search = commands.add_parser("search", parents=[parent], help="search a collection",
                                 description="Search by TEXT, --image or --id (exactly one).")
    search.add_argument("text", nargs="?", type=non_empty, metavar="TEXT", help="a text query")
    search.add_argument("--collection", required=True, type=collection_name, metavar="NAME",
                        help="collection to search")
    search.add_argument("--image", metavar="PATH", help="an image query")
    search.add_argument("--id", metavar="ID", help="find items like this stored one")
    search.add_argument("-k", type=_positive_int, default=10, help="hits wanted (default: 10)")
    search.add_argument("--ef", type=int, default=0, help="HNSW ef (default: server's)")

    commands.add_parser("info", parents=[parent], help="describe the server and its model")
    commands.add_parser("collections", parents=[parent], help="list collections")
    add_item_commands(commands, parent)
    _COMMANDS.update(add_commands(commands, _positive_int, [parent]))  # recommend, classify, ...
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_COMMANDS = {
    "index": _index,
    "search": _search,
    "info": _info,
    "collections": _collections,
    **ITEM_COMMANDS,
}


def _stdout_closed() -> int:
    """Stop quietly when the reader left (`clipsearch duplicates ... | head`), as `cat` does.

    stdout goes to /dev/null so that the interpreter's last flush cannot fail again, and the
    status is 141 (128 + SIGPIPE), the one the shell reports for `cat`, `grep` or `seq` killed
    by the closed pipe: `set -o pipefail` scripts tell it apart from a real failure (1).
    """
    with contextlib.suppress(OSError, ValueError):  # stdout may not be a real file
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return STDOUT_CLOSED


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    serve_args = _serve_args(argv)
    if serve_args is not None:
        return _serve(serve_args)

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":  # only reached with arguments _serve_args did not expect
        parser.error("put the server's options after 'serve'")
    if args.command == "search":
        given = sum(q is not None for q in (args.text, args.image, args.id))
        if given != 1:
            parser.error("search needs exactly one query: TEXT, --image PATH or --id ID")
        if args.image is not None and not Path(args.image).is_file():
            parser.error(f"--image {args.image}: no such file")
    if args.command == "index" and not Path(args.dir).is_dir():
        parser.error(f"not a directory: {args.dir}")

    batch_size = getattr(args, "batch_size", 32)
    try:
        with Client(
            args.server, timeout=args.timeout, batch_size=batch_size,
            token=args.token or os.environ.get(TOKEN_ENV) or None, tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert, tls_key=args.tls_key,
        ) as client:
            status = _COMMANDS[args.command](client, args)
            sys.stdout.flush()  # a reader that left shows here, not in the exit's last flush
            return status
    except BrokenPipeError:
        return _stdout_closed()
    except ClipSearchError as exc:
        if exc.code == grpc.StatusCode.UNAVAILABLE and connection_refused(exc.details or ""):
            print(f"error: cannot connect: {CONNECT_HINT.format(server=args.server)}",
                  file=sys.stderr)
            return 1
        print(f"error: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
