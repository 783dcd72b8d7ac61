"""`clipsearch bench` against a real server: numbers out, and its scratch collection gone."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from clipsearch import Client, TowerTuning
from clipsearch.cli.bench import Phase, _print_table, _report
from conftest import ServerProcess, coco_images


def bench(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clipsearch", "--server", server.address, "bench", *args],
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for f in coco_images(6):
        shutil.copy(f, folder / f.name)
    return folder


def test_bench_reports_rates_and_drops_its_collection(server: ServerProcess, client: Client,
                                                      photos: Path) -> None:
    result = bench(server, "--images", str(photos), "--count", "16", "--clients", "2",
                   "--queries", "20", "--query-clients", "4", "--during-ingest", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "clipsearch-tiny"
    assert report["image_files"] == 6
    phases = report["phases"]
    assert set(phases) == {"ingest", "query", "ingest_during_queries", "query_during_ingest"}
    assert phases["ingest"]["count"] == phases["ingest_during_queries"]["count"] == 16
    assert phases["query"]["count"] == 20
    for phase in phases.values():
        assert phase["per_second"] > 0 and phase["seconds"] > 0 and phase["failed"] == 0
    for key in ("query", "query_during_ingest"):
        assert 0 < phases[key]["p50_ms"] <= phases[key]["p99_ms"]
    for tower, tuning in report["towers"].items():  # only once the server reports them
        assert tuning["inputs_per_second"] > 0, tower
        key = "ingest" if tower == "image" else "query"
        assert phases[key]["of_ceiling"] > 0
    assert report["collection"].startswith("bench-")
    assert report["collection"] not in {c.name for c in client.collections()}


def test_bench_prints_a_table(server: ServerProcess, client: Client, photos: Path) -> None:
    result = bench(server, "--images", str(photos), "--count", "8", "--queries", "8",
                   "--collection", "bench-table")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("model ") and "clipsearch-tiny" in line for line in lines)
    rows = {line.split()[0]: line for line in lines if line.startswith(("ingest", "queries"))}
    assert "img/s" in rows["ingest"] and "q/s" in rows["queries"]
    info = client.info()
    for tower in ("image", "text"):
        line = next(line for line in lines if line.startswith(f"{tower} tower:"))
        assert ("ceiling: not reported by this server" in line) == (tower not in info.towers)
    assert "bench-table" not in {c.name for c in client.collections()}


def test_bench_refuses_an_existing_collection(server: ServerProcess, client: Client,
                                              photos: Path) -> None:
    client.upsert("bench-keep", ids=["one"], images=[next(photos.iterdir())])
    result = bench(server, "--images", str(photos), "--count", "4", "--queries", "4",
                   "--collection", "bench-keep")
    assert result.returncode == 1
    assert "'bench-keep' already exists" in result.stderr
    assert client.collection("bench-keep").count == 1  # not written to, not dropped


def test_bench_without_a_server_says_how_to_point_at_one(photos: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clipsearch", "--server", "127.0.0.1:1", "--timeout", "5",
         "bench", "--images", str(photos)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot connect" in result.stderr and "--server" in result.stderr


def test_ctrl_c_still_drops_the_scratch_collection(server: ServerProcess, client: Client,
                                                   photos: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipsearch", "--server", server.address, "bench", "--images",
         str(photos), "--count", "5000", "--collection", "bench-interrupted"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("... ingest"):
            break
    time.sleep(1)
    assert "bench-interrupted" in {c.name for c in client.collections()}
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "bench-interrupted" not in {c.name for c in client.collections()}


def test_the_ratio_to_each_tower_ceiling(server: ServerProcess, client: Client,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Servers that measure their towers fill `towers`; the bench divides by it."""
    info = client.info()
    tuned = replace(info, towers={"image": TowerTuning(32, 200.0, "measured")})
    ingest, query = Phase("image", 4, count=100, seconds=1.0), Phase("text", 8, 10, 0.5)
    query.latencies_ms = [5.0] * 10
    args = argparse.Namespace(server=server.address, count=100)
    report = _report(args, info, tuned, "bench-x", 6, {"ingest": ingest, "query": query})
    assert report["phases"]["ingest"]["of_ceiling"] == pytest.approx(0.5)
    assert report["phases"]["query"]["of_ceiling"] is None
    assert report["towers"]["image"]["inputs_per_second"] == 200.0
    _print_table(args, info, tuned, "bench-x", 6, {"ingest": ingest, "query": query})
    lines = capsys.readouterr().out.splitlines()
    assert next(ln for ln in lines if ln.startswith("ingest ")).endswith(" 50%")
    assert "image tower: ceiling 200.0 img/s at batch 32 (measured)" in lines
    assert "text tower: ceiling: not reported by this server" in lines
