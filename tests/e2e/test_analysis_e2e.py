"""Recommend, Classify, FindDuplicates and Cluster against a real server, with known answers.

Vectors are placed on purpose (a duplicate pair at cosine 0.99, three separated blobs, a
recommendation whose order is computed by hand); coco128 photos give the end-to-end runs.
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipsearch import BatchError, Client, ClipSearchError
from clipsearch_server.catalog import bundled_config_dir
from conftest import TINY_MODEL, ServerProcess, coco_images


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Exact open_clip preprocessing (no JPEG draft decoding), for the parity checks."""
    # open_clip's exact numbers: its preprocessing (no JPEG draft or device decoding) and fp32
    # (the default, auto, picks bf16 where the hardware has it).
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("analysis") / "data",
                         "--no-jpeg-draft", "--device-decode", "off",
                         "--precision", "fp32").start()
    yield proc
    assert proc.stop() == 0, proc.log()


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def orthogonal(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    u = rng.normal(size=v.shape)
    return unit(u - (u @ v) * v)


def field_of(exc: ClipSearchError) -> list[str]:
    return [f for f, _ in exc.field_violations]


# --- near-duplicates ---------------------------------------------------------------------------
def test_a_placed_pair_at_099_is_the_only_duplicate_group(client: Client) -> None:
    dim = client.info().dim
    rng = np.random.default_rng(7)
    v = unit(rng.normal(size=(300, dim)))
    v[123] = 0.99 * v[45] + np.sqrt(1 - 0.99**2) * orthogonal(v[45], rng)
    ids = [f"v{i:03d}" for i in range(300)]
    client.upsert("dups", ids=ids, vectors=v, metadata=[{"odd": i % 2} for i in range(300)])
    assert (v @ v.T)[~np.eye(300, dtype=bool)].max() == pytest.approx(0.99, abs=1e-5)

    groups = client.find_duplicates("dups", threshold=0.98)
    assert [g.ids for g in groups] == [["v045", "v123"]]
    assert groups[0].members[1][1] == pytest.approx(0.99, abs=1e-4)
    assert groups[0].min_similarity == pytest.approx(0.99, abs=1e-4)
    assert client.find_duplicates("dups", threshold=0.995) == []
    # a filtered part compares only its own items: 45 is odd, 123 is odd, 124 even
    assert [g.ids for g in client.find_duplicates("dups", threshold=0.98,
                                                  filter={"odd": 1})] == [["v045", "v123"]]
    assert client.find_duplicates("dups", threshold=0.98, filter={"odd": 0}) == []


def test_duplicate_groups_are_paged(client: Client) -> None:
    dim = client.info().dim
    rng = np.random.default_rng(8)
    v = unit(rng.normal(size=(60, dim)))
    for a, b in [(1, 2), (10, 11), (20, 21), (30, 31), (40, 41)]:
        v[b] = 0.995 * v[a] + np.sqrt(1 - 0.995**2) * orthogonal(v[a], rng)
    client.upsert("dup-pages", ids=[f"p{i:02d}" for i in range(60)], vectors=v)
    pages = []
    request = client._stub.FindDuplicates
    from clipsearch.v1 import clipsearch_pb2 as pb

    token = ""
    while True:
        r = request(pb.FindDuplicatesRequest(collection="dup-pages", threshold=0.99,
                                             page_size=2, page_token=token))
        pages.append([[m.id for m in g.members] for g in r.groups])
        assert r.total_groups == 5 and r.items_compared == 60
        token = r.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sorted(sorted(g) for p in pages for g in p) == [
        ["p01", "p02"], ["p10", "p11"], ["p20", "p21"], ["p30", "p31"], ["p40", "p41"]]
    assert [g.ids for g in client.find_duplicates("dup-pages", threshold=0.99,
                                                  page_size=2)] == [g for p in pages for g in p]


def _reencoded(data: bytes, quality: int = 60) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def _resized(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    out = io.BytesIO()
    image.resize((image.width // 2, image.height // 2), Image.LANCZOS).save(out, "PNG")
    return out.getvalue()


def test_photos_find_their_reencoded_and_resized_copies(client: Client, server: ServerProcess
                                                         ) -> None:
    files = coco_images(24)
    photos = [f.read_bytes() for f in files]
    ids = [f.name for f in files]
    client.upsert("photos", ids=[*ids, "copy-reencoded", "copy-resized"],
                  images=[*photos, _reencoded(photos[0]), _resized(photos[5])])
    # With random tiny weights every photo lands near every other (cosine ~0.96, at most
    # ~0.996 here); a copy lands at ~0.99999. The threshold sits between the two.
    groups = client.find_duplicates("photos", threshold=0.9995)
    assert sorted(sorted(g.ids) for g in groups) == sorted(
        [sorted([ids[0], "copy-reencoded"]), sorted([ids[5], "copy-resized"])])

    out = subprocess.run([sys.executable, "-m", "clipsearch", "--server", server.address,
                          "duplicates", "--collection", "photos", "--threshold", "0.9995"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("group ") == 2 and "copy-resized" in out.stdout


# --- clusters ---------------------------------------------------------------------------------
def test_three_blobs_become_three_clusters_and_can_be_written_back(client: Client) -> None:
    dim = client.info().dim
    rng = np.random.default_rng(9)
    centres = unit(rng.normal(size=(3, dim)))
    sizes = [15, 40, 25]
    v = unit(np.concatenate([c + 0.05 * rng.normal(size=(n, dim))
                             for c, n in zip(centres, sizes, strict=True)]))
    blob = np.repeat([0, 1, 2], sizes)
    ids = [f"b{b}-{i:02d}" for i, b in enumerate(blob)]
    client.upsert("blobs", ids=ids, vectors=v, metadata=[{"blob": int(b)} for b in blob])

    result = client.cluster("blobs", 3, top_n=4, metadata_key="theme", include_centroids=True)
    assert result.sizes == [40, 25, 15] and result.items_clustered == 80
    assert result.items_labelled == 80
    expected_blob = [1, 2, 0]  # the largest blob is cluster 0
    for c in result.clusters:
        assert len(c.central) == 4
        assert all(h.metadata["blob"] == expected_blob[c.cluster] for h in c.central)
        # the hits show the labels just written, not what the items held before
        assert all(h.metadata["theme"] == c.cluster for h in c.central)
        np.testing.assert_allclose(c.centroid, centres[expected_blob[c.cluster]], atol=0.05)
    # the cluster number is in each item's metadata, and filters see it
    for c, b in enumerate(expected_blob):
        members = {r.id for r in client.scroll("blobs", filter={"theme": c})}
        assert members == {id_ for id_, bb in zip(ids, blob, strict=True) if bb == b}
    # a filtered part: only blobs 0 and 2
    part = client.cluster("blobs", 2, filter={"blob": {"$in": [0, 2]}})
    assert part.sizes == [25, 15]
    # written again over a part whose old labels differ (2 and 0 before, 0 and 1 now)
    again = client.cluster("blobs", 2, filter={"blob": {"$in": [0, 2]}}, metadata_key="theme")
    for c in again.clusters:
        assert all(h.metadata["theme"] == c.cluster for h in c.central)


# --- recommend --------------------------------------------------------------------------------
def test_recommend_order_matches_a_hand_computation(client: Client) -> None:
    dim = client.info().dim
    rng = np.random.default_rng(10)
    v = unit(rng.normal(size=(40, dim)))
    ids = [f"r{i:02d}" for i in range(40)]
    client.upsert("rec", ids=ids, vectors=v)
    liked, skipped = 3, 17

    query = unit(v[liked] - 0.5 * v[skipped])
    expected = [ids[i] for i in np.argsort(-(v @ query)) if i not in (liked, skipped)][:8]
    hits = client.recommend("rec", [ids[liked]], [ids[skipped]], k=8, ef=500)
    assert [h.id for h in hits] == expected
    assert hits[0].score == pytest.approx(float(v[ids.index(hits[0].id)] @ query), abs=1e-5)

    best = np.where((v @ v[liked]) > (v @ v[skipped]), v @ v[liked], -(v @ v[skipped]) ** 2)
    expected = [ids[i] for i in np.argsort(-best, kind="stable") if i not in (liked, skipped)]
    hits = client.recommend("rec", [ids[liked]], [ids[skipped]], k=8, ef=500,
                            strategy="best_score")
    assert [h.id for h in hits] == expected[:8]
    # a vector example mixes with an id example
    query = unit((v[liked] + v[5]) / 2)
    hits = client.recommend("rec", [ids[liked], v[5]], k=3, ef=500)
    assert [h.id for h in hits] == [ids[i] for i in np.argsort(-(v @ query))
                                    if i != liked][:3]


def test_recommend_embeds_text_examples_like_a_search(client: Client) -> None:
    files = coco_images(12)
    client.upsert("rec-photos", ids=[f.name for f in files], images=files)
    search = client.search("rec-photos", text="a dog on a beach", k=5)
    hits = client.recommend("rec-photos", [{"text": "a dog on a beach"}], k=5)
    assert [h.id for h in hits] == [h.id for h in search]
    hits = client.recommend("rec-photos", [{"image": files[2]}], k=1)
    assert hits[0].id == files[2].name  # an image example is not a stored id: it may come back


def test_recommend_bad_input(client: Client) -> None:
    client.upsert("rec-bad", ids=["a", "b"], vectors=np.eye(2, client.info().dim))
    with pytest.raises(ClipSearchError) as exc:
        client.recommend("rec-bad", [], k=3)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(exc.value) == ["positives"]
    with pytest.raises(ClipSearchError) as exc:
        client.recommend("rec-bad", ["a", "ghost"], ["phantom"], k=3)
    assert exc.value.code == grpc.StatusCode.NOT_FOUND and "'ghost'" in exc.value.details
    assert field_of(exc.value) == ["positives[1].id"]
    with pytest.raises(ClipSearchError) as exc:
        client.recommend("rec-bad", ["a"], ["a"], k=3, negative_weight=1.0)
    assert field_of(exc.value) == ["negatives"]
    with pytest.raises(ClipSearchError) as exc:
        client.recommend("nope", ["a"], k=3)
    assert exc.value.code == grpc.StatusCode.NOT_FOUND


# --- classify ---------------------------------------------------------------------------------
LABELS = ["dog", "cat", "a red double-decker bus", "pizza", "a person riding a horse"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "art of a {}"]


def _upright(path: Path) -> bool:
    with Image.open(path) as img:
        return img.getexif().get(0x0112, 1) == 1


def test_classify_matches_open_clips_zero_shot(client: Client, tiny_checkpoint: Path) -> None:
    open_clip.add_model_config(bundled_config_dir())
    model, _, preprocess = open_clip.create_model_and_transforms(
        TINY_MODEL, pretrained=str(tiny_checkpoint))
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    files = [f for f in coco_images(16) if _upright(f)][:6]
    with torch.inference_mode():
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, LABELS, TEMPLATES,
                                                          device="cpu")
        feats = model.encode_image(torch.stack([preprocess(Image.open(f)) for f in files]),
                                   normalize=True)
        expected = (model.logit_scale.exp() * feats @ classifier).softmax(dim=-1).numpy()

    results = client.classify(files, LABELS, templates=TEMPLATES, top_n=2)
    got = np.array([[s.probability for s in r.scores] for r in results])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(expected - expected.mean(axis=1, keepdims=True)).max() > 1e-3  # informative
    for r, row in zip(results, expected, strict=True):
        assert [s.label for s in r.top] == [LABELS[j] for j in np.argsort(-row)[:2]]
    # again: label embeddings now come from the cache, with the same answer
    again = client.classify(files, LABELS, templates=TEMPLATES)
    np.testing.assert_allclose([[s.probability for s in r.scores] for r in again], got,
                               atol=1e-6)
    # stored items are classified by their vectors
    client.upsert("cls", ids=["x"], images=[files[1]])
    by_id = client.classify(labels=LABELS, templates=TEMPLATES, ids=["x"], collection="cls")
    np.testing.assert_allclose([s.probability for s in by_id[0].scores], got[1], atol=1e-5)


def test_classify_default_template_and_bad_input(client: Client) -> None:
    files = coco_images(3)
    with pytest.raises(BatchError) as exc:
        client.classify([files[0], b"not an image", files[1]], ["dog", "cat"])
    assert [e.index for e in exc.value.errors] == [1]
    assert exc.value.errors[0].code == grpc.StatusCode.INVALID_ARGUMENT
    results = exc.value.results
    assert results[1] is None and results[0].index == 0 and results[2].index == 2
    assert sum(results[0].probabilities.values()) == pytest.approx(1.0, abs=1e-5)

    cases = [
        (dict(labels=[f"l{i}" for i in range(1001)]), "labels"),
        (dict(labels=["only"]), "labels"),
        (dict(labels=["dog", "dog"]), "labels[1]"),
        (dict(labels=["dog", " "]), "labels[1]"),
        (dict(labels=["dog", "cat"], templates=["no slot"]), "templates[0]"),
        (dict(labels=["dog", "cat"], templates=["{} and {}"]), "templates[0]"),
        (dict(labels=["dog", "cat"], templates=["{0.__class__}"]), "templates[0]"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ClipSearchError) as exc:
            client.classify([files[0]], **kwargs)
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT, kwargs
        assert field_of(exc.value) == [field], kwargs
    client.upsert("cls-bad", ids=["a"], images=[files[0]])
    with pytest.raises(ClipSearchError) as exc:
        client.classify(labels=["dog", "cat"], ids=["a", "missing"], collection="cls-bad")
    assert exc.value.code == grpc.StatusCode.NOT_FOUND and "'missing'" in exc.value.details
    assert field_of(exc.value) == ["inputs[1].id"]


def test_classify_cli(server: ServerProcess) -> None:
    files = coco_images(2)
    out = subprocess.run([sys.executable, "-m", "clipsearch", "--server", server.address,
                          "classify", *map(str, files), "--labels", "dog,cat,bus", "--top", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(files[0]) and len(lines) == 6
    assert {line.split()[1] for line in lines[1:3]} <= {"dog", "cat", "bus"}


# --- cluster and duplicates: bad input ------------------------------------------------------
def test_cluster_and_duplicates_bad_input(client: Client) -> None:
    client.upsert("few", ids=["a", "b", "c"], vectors=np.eye(3, client.info().dim))
    cases = [
        (lambda: client.cluster("few", 4), "INVALID_ARGUMENT", "n_clusters"),
        (lambda: client.cluster("few", 1), "INVALID_ARGUMENT", "n_clusters"),
        (lambda: client.cluster("few", 2, metadata_key="a.b"), "INVALID_ARGUMENT",
         "metadata_key"),
        (lambda: client.cluster("few", 2, top_n=101), "INVALID_ARGUMENT", "top_n"),
        (lambda: client.find_duplicates("few", threshold=0.0), "INVALID_ARGUMENT", "threshold"),
        (lambda: client.find_duplicates("few", threshold=1.5), "INVALID_ARGUMENT", "threshold"),
        (lambda: client.find_duplicates("few", threshold=float("nan")), "INVALID_ARGUMENT",
         "threshold"),
        (lambda: client.find_duplicates("few", neighbors=101), "INVALID_ARGUMENT", "neighbors"),
        (lambda: client.find_duplicates("few", page_size=1001), "INVALID_ARGUMENT",
         "page_size"),
    ]
    for call, code, field in cases:
        with pytest.raises(ClipSearchError) as exc:
            call()
        assert exc.value.code.name == code and field_of(exc.value) == [field], field
    from clipsearch.v1 import clipsearch_pb2 as pb

    with pytest.raises(grpc.RpcError) as rpc:
        client._stub.FindDuplicates(pb.FindDuplicatesRequest(collection="few",
                                                             page_token="garbage!"))
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ClipSearchError) as exc:
        client.cluster("absent", 2)
    assert exc.value.code == grpc.StatusCode.NOT_FOUND
    assert client.find_duplicates("few", threshold=1.0) == []  # (0, 1] includes 1
    # nothing was written by the refused calls
    assert all("theme" not in r.metadata for r in client.scroll("few"))


def test_recommend_and_cluster_cli(client: Client, server: ServerProcess) -> None:
    dim = client.info().dim
    rng = np.random.default_rng(11)
    centres = unit(rng.normal(size=(2, dim)))
    v = unit(np.concatenate([c + 0.05 * rng.normal(size=(6, dim)) for c in centres]))
    ids = [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)]
    client.upsert("cli-analysis", ids=ids, vectors=v)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "clipsearch", "--server", server.address,
                               *args], capture_output=True, text=True, timeout=120)

    out = run("recommend", "--collection", "cli-analysis", "--like", "a0", "--unlike", "b0",
              "-k", "5")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert sorted(r[2] for r in rows) == ["a1", "a2", "a3", "a4", "a5"]
    out = run("cluster", "--collection", "cli-analysis", "-n", "2", "--top", "2",
              "--write-key", "group")
    assert out.returncode == 0, out.stderr
    assert "cluster 0: 6 items" in out.stdout and "cluster 1: 6 items" in out.stdout
    assert "wrote metadata key 'group' on 12 items" in out.stdout
    out = run("recommend", "--collection", "cli-analysis", "--like", "nobody")
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr and "'nobody'" in out.stderr
