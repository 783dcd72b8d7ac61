"""The `clipsearch` command against a real server: index a folder, search it, inspect."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ServerProcess, coco_images


def clipsearch(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clipsearch", "--server", server.address, *args],
        capture_output=True, text=True, timeout=300,
    )


def test_index_a_folder_then_search_it(server: ServerProcess, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    files = coco_images(12)
    for f in files[:8]:
        shutil.copy(f, photos / f.name)
    for f in files[8:]:
        shutil.copy(f, photos / "nested" / f.name)
    (photos / "notes.txt").write_text("not an image")
    (photos / "fake.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated nonsense")

    result = clipsearch(server, "index", str(photos), "--collection", "cli-photos")
    assert result.returncode == 1, result.stderr  # fake.jpg failed
    out = result.stdout + result.stderr
    assert "fake.jpg" in out  # the server refused it; it is reported by name
    listing = clipsearch(server, "collections")
    assert "cli-photos" in listing.stdout
    assert any(line.split()[:2] == ["cli-photos", "12"] for line in listing.stdout.splitlines())

    by_image = clipsearch(server, "search", "--collection", "cli-photos",
                          "--image", str(files[9]), "-k", "3")
    assert by_image.returncode == 0, by_image.stderr
    rows = [line for line in by_image.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 3
    assert f"nested/{files[9].name}" in rows[0]

    by_text = clipsearch(server, "search", "--collection", "cli-photos", "a dog", "-k", "5")
    assert by_text.returncode == 0, by_text.stderr
    assert len([ln for ln in by_text.stdout.splitlines() if ln.strip()[:1].isdigit()]) == 5

    info = clipsearch(server, "info")
    assert "clipsearch-tiny" in info.stdout


def test_errors_are_reported_with_their_code(server: ServerProcess) -> None:
    result = clipsearch(server, "search", "--collection", "no-such-collection", "a dog")
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr
