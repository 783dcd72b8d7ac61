"""The `clipsearch` command as a script sees it: exit codes, flag placement, help, the item
verbs, a clear message when no server answers, and arguments checked before any work."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from clipsearch import Client
from clipsearch.cli import build_parser
from clipsearch.images import sniff_image
from conftest import ServerProcess, coco_images, free_port


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clipsearch", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_index_exits_non_zero_when_a_file_failed(server: ServerProcess, tmp_path: Path
                                                  ) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in coco_images(2):
        shutil.copy(f, photos / f.name)
    (photos / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated nonsense")
    # the connection flag after the subcommand
    result = run("index", str(photos), "--collection", "scripts-a", "--server", server.address)
    assert result.returncode == 1, result.stderr
    assert "indexed 2, skipped 0 not images, failed 1" in result.stdout
    assert "cut.jpg" in result.stderr


def test_index_of_a_folder_without_images_says_so(server: ServerProcess, tmp_path: Path
                                                  ) -> None:
    (tmp_path / "notes.txt").write_text("no pictures here")
    result = run("--server", server.address, "index", str(tmp_path), "--collection", "empty")
    assert result.returncode == 1
    assert f"no images found in {tmp_path}" in result.stderr
    assert "indexed 0" in result.stdout


def test_item_verbs(server: ServerProcess) -> None:
    with Client(server.address) as c:
        c.upsert("scripts-b", ids=["a", "b", "c"], texts=["a cat", "a dog", "a car"],
                 metadata=[{"album": "x"}, {"album": "y"}, {"album": "x"}])
    addr = ("--server", server.address)
    counted = run("count", "--collection", "scripts-b", *addr)
    assert (counted.returncode, counted.stdout.strip()) == (0, "3")
    filtered = run(*addr, "count", "--collection", "scripts-b", "--filter", '{"album": "x"}')
    assert filtered.stdout.strip() == "2", filtered.stderr
    got = run("get", "--collection", "scripts-b", "a", "c", *addr)
    assert got.returncode == 0, got.stderr
    rows = [json.loads(line) for line in got.stdout.splitlines()]
    assert rows == [{"id": "a", "metadata": {"album": "x"}},
                    {"id": "c", "metadata": {"album": "x"}}]
    missing = run("get", "--collection", "scripts-b", "a", "zzz", *addr)
    assert missing.returncode == 1 and "not found: zzz" in missing.stderr
    deleted = run("delete", "--collection", "scripts-b", "a", "zzz", *addr)
    assert (deleted.returncode, deleted.stdout.strip()) == (0, "deleted 1 of 2 ids")
    assert run("count", "--collection", "scripts-b", *addr).stdout.strip() == "2"
    dropped = run("drop", "--collection", "scripts-b", *addr)
    assert dropped.returncode == 0, dropped.stderr
    again = run("drop", "--collection", "scripts-b", *addr)
    assert again.returncode == 1 and "does not exist" in again.stderr
    assert run("drop", "--collection", "scripts-b", "--missing-ok", *addr).returncode == 0


def test_a_reader_that_leaves_early_is_not_an_error(server: ServerProcess) -> None:
    """`clipsearch get ... | head -1` (issue 18): no "Broken pipe", and 141 as `cat` gives."""
    ids = [f"item-{i:04d}" for i in range(300)]  # more lines than a pipe's write buffer
    with Client(server.address) as c:
        c.upsert("scripts-pipe", ids=ids, texts=["a cat"] * len(ids))
    read, write = os.pipe()
    os.close(read)  # the reader left before the first line
    try:
        result = subprocess.run(
            [sys.executable, "-m", "clipsearch", "--server", server.address, "get",
             "--collection", "scripts-pipe", *ids],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert result.returncode == 141, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("command", [["clipsearch", "serve"], ["clipsearch_server"]])
def test_a_missing_checkpoint_is_refused_at_once(tmp_path: Path, command: list[str]) -> None:
    """Issue 18: it was refused after torch's import (5-20 s), under 40 lines of usage."""
    missing = tmp_path / "missing.pt"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", *command, "--checkpoint", str(missing),
                             "--data-dir", str(tmp_path / "data")],
                            capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 10  # about 0.5 s; the import alone took 5 s or more
    assert result.returncode == 2
    assert f"error: --checkpoint {missing} is not a file" in result.stderr
    assert len(result.stderr.splitlines()) <= 2, result.stderr  # the reason and a short usage


def test_refused_connection_names_the_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    result = run("collections", "--server", address, "--timeout", "10")
    assert result.returncode == 1
    assert (f"is the server running at {address}? (--server or CLIPSEARCH_SERVER)"
            in result.stderr)


@pytest.mark.parametrize("args", [
    ["--collection", "bad name"],
    ["--collection", "abc\n"],
    ["--collection", "ok", "--batch-size", "0"],
])
def test_index_arguments_are_checked_before_the_walk(tmp_path: Path, args: list[str]) -> None:
    for f in coco_images(1):
        shutil.copy(f, tmp_path / f.name)
    # no server runs at this address: a check after connecting would say so instead
    result = run("--server", f"127.0.0.1:{free_port()}", "index", str(tmp_path), *args)
    assert result.returncode == 2, result.stderr
    assert "usage:" in result.stderr and "skipping" not in result.stderr


@pytest.mark.parametrize("args", [
    ["search", "--collection", "ok", "-k", "0", "cat"],
    ["search", "--collection", "ok", "   "],
    ["search", "--collection", "-bad", "cat"],
    ["search", "--collection", "ok", "--image", "/no/such/file.jpg"],
    ["index", "/no/such/folder", "--collection", "ok"],
    ["count", "--collection", "a/b"],
])
def test_bad_arguments_are_usage_errors(args: list[str]) -> None:
    result = run("--server", f"127.0.0.1:{free_port()}", *args)
    assert result.returncode == 2, result.stderr
    assert "cannot connect" not in result.stderr


def test_every_subcommand_and_option_has_help() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in commands._choices_actions}
    assert set(helps) >= {"index", "search", "info", "collections", "drop", "delete", "get",
                          "count"}
    assert all(helps.values()), helps
    for name, sub in commands.choices.items():
        if name == "serve":  # its options belong to the server: clipsearch serve --help
            continue
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_new_photo_formats_are_found_by_content() -> None:
    img = Image.new("RGB", (8, 8))
    for fmt, kind in (("HEIF", "heif"), ("AVIF", "avif"), ("JXL", "jxl")):
        pytest.importorskip({"HEIF": "pillow_heif", "JXL": "pillow_jxl"}.get(fmt, "PIL"))
        if fmt == "HEIF":
            import pillow_heif
            pillow_heif.register_heif_opener()
        if fmt == "JXL":
            import pillow_jxl  # noqa: F401
        buf = io.BytesIO()
        img.save(buf, fmt)
        assert sniff_image(buf.getvalue()[:18]) == kind, fmt
