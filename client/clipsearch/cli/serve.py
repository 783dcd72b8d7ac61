"""The serve command: hands its arguments to the server's own entry point.

The server is imported only when asked for: the client's install has no server, and the rest
of the command line imports neither torch nor Pillow.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clipsearch.cli.options import OPTIONS_WITH_VALUE


def add_commands(commands: argparse._SubParsersAction) -> None:
    # Listed for the help only: its arguments are found by serve_args and go to the server.
    commands.add_parser(
        "serve", help="run the server (its options: clipsearch serve --help)", add_help=False
    )


def serve_args(argv: Sequence[str]) -> list[str] | None:
    """The arguments after ``serve`` when that is the command, else None.

    Found by hand because argparse would swallow ``serve --help`` instead of passing it on.
    """
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in OPTIONS_WITH_VALUE:
            i += 2
        elif token.startswith(tuple(f"{o}=" for o in OPTIONS_WITH_VALUE)):
            i += 1
        elif token == "serve":
            return list(argv[i + 1 :])
        else:
            return None
    return None


def serve(args: list[str]) -> int:
    """Runs the server with ``args``; returns its exit status."""
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
