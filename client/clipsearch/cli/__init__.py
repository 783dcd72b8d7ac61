"""The ``clipsearch`` command: serve, index a folder, search, and look at the server.

One module per group of commands, each adding its parsers (`add_commands`) and, through
``set_defaults``, its handler (``run``) and the checks argparse cannot make (``check``):

    serve.py     serve: the server's own entry point, imported only when asked for
    index.py     index: every image under a folder
    search.py    search, and the table of hits
    items.py     drop, delete, get, count
    info.py      info, collections, and this client's version
    analysis.py  recommend, classify, duplicates, cluster
    bench.py     bench: ingest and query speed against a scratch collection, to compare hardware
    options.py   the connection options and argument types that they share

Everything except ``serve`` talks to a running server through the thin client, so the command
line imports neither torch nor Pillow.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import grpc

from clipsearch.cli import analysis, bench, index, info, items, search, serve
from clipsearch.cli.options import (
    CONNECT_HINT,
    TOKEN_ENV,
    add_connection_options,
    connection_refused,
)
from clipsearch.client import Client
from clipsearch.errors import ClipSearchError

STDOUT_CLOSED = 128 + 13  # the shell's status of a command killed by SIGPIPE


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (without ``serve``'s own options, which the server owns)."""
    parser = argparse.ArgumentParser(
        prog="clipsearch",
        description="CLIP text-to-image and image-to-image search. A server that wants a "
        f"bearer token gets it from ${TOKEN_ENV}.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {info.client_version()}",
                        help="print the client's version and exit")
    add_connection_options(parser, top=True)
    parent = argparse.ArgumentParser(add_help=False)
    add_connection_options(parent, top=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_commands(commands)
    for group in (index, search, info, items, analysis, bench):
        group.add_commands(commands, parent)
    return parser


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
    serve_args = serve.serve_args(argv)
    if serve_args is not None:
        return serve.serve(serve_args)

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":  # only reached with arguments serve_args did not expect
        parser.error("put the server's options after 'serve'")
    if hasattr(args, "check"):
        args.check(parser, args)

    batch_size = getattr(args, "batch_size", 32)
    try:
        with Client(
            args.server, timeout=args.timeout, batch_size=batch_size,
            token=args.token or os.environ.get(TOKEN_ENV) or None, tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert, tls_key=args.tls_key,
        ) as client:
            status = args.run(client, args)
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
