"""Unit tests of the thin client and the command line: no real server, no torch.

Wire-format helpers, batching and file discovery are tested as pure functions. The Client and
the CLI are exercised against a small in-process fake of the gRPC service, which records what
it receives, so batching and error mapping are checked end to end over a real channel.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import types
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from clipsearch import BatchError, Client, ClipSearchError, CollectionInfo, ItemFailure, cli
from clipsearch.images import SNIFF_BYTES, discover_images, sniff_image
from clipsearch.results import (
    decode_matrix,
    decode_vector,
    encode_matrix,
    encode_vector,
    metadata_to_struct,
    struct_to_metadata,
)
from clipsearch.upload import iter_batches
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"
DIM = 4

# Minimal real headers, for tests that must not need Pillow.
PNG_HEAD = b"\x89PNG\r\n\x1a\n" + b"\x00" * 10
JPEG_HEAD = b"\xff\xd8\xff\xe0" + b"\x00" * 14


# --------------------------------------------------------------------------------------------
# Wire format


def test_vector_roundtrip_is_little_endian_float32() -> None:
    values = np.array([1.5, -2.0, 3.25, 0.0], dtype=">f4")  # big-endian input on purpose
    msg = encode_vector(values)
    assert msg.dim == 4
    assert msg.data == np.array([1.5, -2.0, 3.25, 0.0], dtype="<f4").tobytes()
    out = decode_vector(msg)
    assert out.dtype == np.float32 and out.flags.writeable
    np.testing.assert_array_equal(out, [1.5, -2.0, 3.25, 0.0])
    # A one-row matrix is accepted as a vector; lists too.
    assert encode_vector([[1.0, 2.0]]).dim == 2


@pytest.mark.parametrize("bad", [[], [[1.0, 2.0], [3.0, 4.0]], [1.0, float("nan")], [np.inf]])
def test_encode_vector_rejects_bad_input(bad: object) -> None:
    with pytest.raises(ValueError):
        encode_vector(bad)


def test_matrix_roundtrip() -> None:
    rng = np.random.default_rng(0)
    m = rng.standard_normal((5, 3)).astype(np.float64)
    msg = encode_matrix(m)
    assert (msg.rows, msg.dim, len(msg.data)) == (5, 3, 5 * 3 * 4)
    out = decode_matrix(msg)
    assert out.shape == (5, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, m.astype(np.float32))


def test_decode_rejects_wrong_byte_length() -> None:
    with pytest.raises(ClipSearchError) as exc:
        decode_vector(pb.Vector(data=b"\x00" * 12, dim=4))
    assert exc.value.code == grpc.StatusCode.INTERNAL
    with pytest.raises(ClipSearchError):
        decode_matrix(pb.Matrix(data=b"\x00" * 16, rows=2, dim=4))


def test_metadata_roundtrip_numbers_become_floats() -> None:
    meta = {"path": "a/b.jpg", "n": 3, "tags": ["x", 1.5], "nested": {"ok": True, "z": None}}
    back = struct_to_metadata(metadata_to_struct(meta))
    assert back == {"path": "a/b.jpg", "n": 3.0, "tags": ["x", 1.5], "nested": meta["nested"]}
    assert isinstance(back["n"], float)
    assert struct_to_metadata(metadata_to_struct(None)) == {}


@pytest.mark.parametrize("bad", [{1: "int key"}, {"x": object()}, ["not", "a", "mapping"]])
def test_metadata_rejects_non_json(bad: object) -> None:
    with pytest.raises(TypeError):
        metadata_to_struct(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Batching


def _batch_indexes(sizes: list[int], max_items: int, max_bytes: int) -> list[list[int]]:
    batches = iter_batches(sizes, lambda s: s, max_items=max_items, max_bytes=max_bytes)
    return [[i for i, _ in batch] for batch in batches]


def test_batches_split_by_count() -> None:
    assert _batch_indexes([1] * 7, 3, 10**9) == [[0, 1, 2], [3, 4, 5], [6]]
    assert _batch_indexes([1] * 6, 3, 10**9) == [[0, 1, 2], [3, 4, 5]]
    assert _batch_indexes([], 3, 10**9) == []


def test_batches_split_by_bytes() -> None:
    assert _batch_indexes([40, 40, 30, 50, 60], 100, 100) == [[0, 1], [2, 3], [4]]
    # Exactly at the limit fits; one byte more does not.
    assert _batch_indexes([50, 50, 1], 100, 100) == [[0, 1], [2]]


def test_oversized_item_goes_alone() -> None:
    assert _batch_indexes([10, 500, 10, 10], 100, 100) == [[0], [1], [2, 3]]


def test_batches_are_lazy() -> None:
    consumed: list[int] = []

    def source():
        for i in range(10):
            consumed.append(i)
            yield i

    first = next(iter_batches(source(), lambda _: 1, max_items=3, max_bytes=100))
    assert [item for _, item in first] == [0, 1, 2]
    assert consumed == [0, 1, 2, 3]  # the fourth was read to learn the batch was full


# --------------------------------------------------------------------------------------------
# Image sniffing and file discovery


def _pil_bytes(fmt: str) -> bytes:
    image_mod = pytest.importorskip("PIL.Image")
    buf = io.BytesIO()
    image_mod.new("RGB", (8, 6), (200, 30, 40)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "name"),
    [
        ("PNG", "png"),
        ("JPEG", "jpeg"),
        ("GIF", "gif"),
        ("WEBP", "webp"),
        ("BMP", "bmp"),
        ("TIFF", "tiff"),
    ],
)
def test_sniff_real_images(fmt: str, name: str) -> None:
    data = _pil_bytes(fmt)
    assert sniff_image(data[:SNIFF_BYTES]) == name


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"hello world, not an image",
        b"BM but only text here.....",
        b"RIFF\x00\x00\x00\x00WAVE",
        b"%PDF-1.7\n",
        b"\xff\xd8",
        b"GIF88a",
    ],
)
def test_sniff_rejects_non_images(head: bytes) -> None:
    assert sniff_image(head) is None


def test_discover_images_walks_sorted_and_relative(tmp_path: Path) -> None:
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    (tmp_path / "z.png").write_bytes(PNG_HEAD)
    (tmp_path / "b" / "deep" / "photo.dat").write_bytes(JPEG_HEAD)  # extension lies
    (tmp_path / "a" / "fake.jpg").write_text("I am text")  # extension lies the other way
    (tmp_path / "a" / "x.png").write_bytes(PNG_HEAD)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")

    found = discover_images(tmp_path)
    assert found.images == ["a/x.png", "b/deep/photo.dat", "z.png"]
    assert found.not_images == ["a/fake.jpg", "empty.png", "notes.txt"]
    assert found.unreadable == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads anything")
def test_discover_reports_unreadable(tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG_HEAD)
    secret.chmod(0)
    try:
        found = discover_images(tmp_path)
    finally:
        secret.chmod(0o600)
    assert [rel for rel, _ in found.unreadable] == ["secret.png"]
    assert found.images == []


# --------------------------------------------------------------------------------------------
# Import hygiene


def test_client_imports_without_torch_and_pillow() -> None:
    code = textwrap.dedent(
        """
        import sys

        BLOCKED = ("torch", "PIL", "open_clip", "clipsearch_server", "hnswlib")

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Blocker())
        import clipsearch, clipsearch.cli, clipsearch.client
        from clipsearch import Client
        Client("127.0.0.1:1").close()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        # serve without the server installed explains itself and exits 2
        assert clipsearch.cli.main(["serve", "--help"]) == 2
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(CLIENT_DIR)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "pip install 'clipsearch[server]'" in result.stderr


def test_python_dash_m_runs_the_cli() -> None:
    env = {**os.environ, "PYTHONPATH": str(CLIENT_DIR)}
    result = subprocess.run(
        [sys.executable, "-m", "clipsearch", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for command in ("serve", "index", "search", "info", "collections"):
        assert command in result.stdout


# --------------------------------------------------------------------------------------------
# A fake service over a real channel


def _is_image(data: bytes) -> bool:
    return sniff_image(data[:SNIFF_BYTES]) is not None


def _text_vector(text: str) -> list[float]:
    return [float(len(text)), 1.0, 0.0, 0.0]


class FakeService(pb_grpc.ClipSearchServiceServicer):
    """Records requests; texts equal to "bad" and non-images fail per item."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, object]] = []
        self.items: dict[str, pb.Item] = {}
        self.reject_ids: set[str] = set()

    def calls(self, method: str) -> list:
        return [r for m, r in self.requests if m == method]

    def EmbedTexts(self, request, context):
        self.requests.append(("EmbedTexts", request))
        rows, errors = [], []
        for i, text in enumerate(request.texts):
            if text == "bad":
                rows.append([0.0] * DIM)
                errors.append(pb.ItemError(index=i, code=3, message="bad text"))
            else:
                rows.append(_text_vector(text))
        return pb.EmbedTextsResponse(
            vectors=encode_matrix(np.array(rows).reshape(-1, DIM)), errors=errors
        )

    def EmbedImages(self, request, context):
        self.requests.append(("EmbedImages", request))
        rows, errors = [], []
        for i, data in enumerate(request.images):
            if _is_image(data):
                rows.append([float(len(data)), 0.0, 1.0, 0.0])
            else:
                rows.append([0.0] * DIM)
                errors.append(pb.ItemError(index=i, code=3, message="cannot decode image"))
        return pb.EmbedImagesResponse(
            vectors=encode_matrix(np.array(rows).reshape(-1, DIM)), errors=errors
        )

    def UpsertItems(self, request, context):
        self.requests.append(("UpsertItems", request))
        if request.collection == "forbidden":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no writing here")
        errors, written = [], 0
        for i, item in enumerate(request.items):
            kind = item.WhichOneof("content")
            if (
                (kind == "image" and not _is_image(item.image))
                or (kind == "text" and item.text == "bad")
                or item.id in self.reject_ids
            ):
                errors.append(pb.ItemError(index=i, code=3, message=f"bad {kind}"))
                continue
            self.items[item.id] = item
            written += 1
        return pb.UpsertItemsResponse(upserted=written, errors=errors)

    def GetItems(self, request, context):
        self.requests.append(("GetItems", request))
        found = [i for i in request.ids if i in self.items]
        out = []
        for id_ in found:
            item = pb.StoredItem(id=id_, metadata=self.items[id_].metadata)
            if request.include_vectors:
                item.vector.CopyFrom(encode_vector(np.arange(DIM) + 1.0))
            out.append(item)
        return pb.GetItemsResponse(
            items=out, missing_ids=[i for i in request.ids if i not in self.items]
        )

    def DeleteItems(self, request, context):
        self.requests.append(("DeleteItems", request))
        return pb.DeleteItemsResponse(
            deleted=sum(self.items.pop(i, None) is not None for i in request.ids)
        )

    def CountItems(self, request, context):
        if request.collection != "c":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no collection {request.collection!r}")
        return pb.CountItemsResponse(count=len(self.items))

    def Search(self, request, context):
        self.requests.append(("Search", request))
        hits = [
            pb.Hit(id="first", score=0.9, metadata=metadata_to_struct({"path": "p/1.png"})),
            pb.Hit(id="second", score=0.5),
        ]
        if request.include_vectors:
            hits[0].vector.CopyFrom(encode_vector([1.0, 0.0, 0.0, 0.0]))
        return pb.SearchResponse(hits=hits[: request.k])

    def CreateCollection(self, request, context):
        if request.name == "taken":
            context.abort(grpc.StatusCode.ALREADY_EXISTS, "collection 'taken' exists")
        return pb.CreateCollectionResponse(
            collection=pb.CollectionInfo(
                name=request.name,
                dim=DIM,
                model_fingerprint="fp",
                hnsw=request.hnsw,
                created_at=1.5,
            )
        )

    def ListCollections(self, request, context):
        return pb.ListCollectionsResponse(
            collections=[
                pb.CollectionInfo(
                    name="c",
                    count=len(self.items),
                    dim=DIM,
                    model_fingerprint="fp",
                    hnsw=pb.HnswConfig(m=16, ef_construction=200),
                ),
            ]
        )

    def DropCollection(self, request, context):
        return pb.DropCollectionResponse(dropped=request.name == "c")

    def GetServerInfo(self, request, context):
        return pb.GetServerInfoResponse(
            model="ViT-B-32",
            dim=DIM,
            device="cpu",
            precision="fp32",
            random_weights=True,
            max_k=100,
            max_message_bytes=64 << 20,
            version="0.1.0",
        )


@pytest.fixture
def fake() -> tuple[FakeService, str]:
    service = FakeService()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", 64 << 20)],
    )
    pb_grpc.add_ClipSearchServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_embed_texts_batches_by_count(fake) -> None:
    service, target = fake
    texts = [f"text number {i}" for i in range(7)]
    with Client(target, batch_size=3) as client:
        out = client.embed_texts(texts)
    assert [len(r.texts) for r in service.calls("EmbedTexts")] == [3, 3, 1]
    assert out.shape == (7, DIM) and out.dtype == np.float32
    np.testing.assert_array_equal(out, [_text_vector(t) for t in texts])


def test_embed_texts_batches_by_bytes(fake) -> None:
    service, target = fake
    texts = ["x" * 3000] * 7
    # Half of 20000 bytes is the per-request budget: three 3000-byte texts fit, four do not.
    with Client(target, batch_size=100, max_message_bytes=20000) as client:
        client.embed_texts(texts)
    assert [len(r.texts) for r in service.calls("EmbedTexts")] == [3, 3, 1]


def test_batch_error_maps_indexes_and_keeps_good_rows(fake) -> None:
    service, target = fake
    texts = ["a", "bad", "ccc", "dd", "bad", "e", "huge" * 5000]
    client = Client(target, batch_size=2, max_message_bytes=20000)
    with client, pytest.raises(BatchError) as exc:
        client.embed_texts(texts)
    err = exc.value
    assert [(f.index, f.code) for f in err.errors] == [
        (1, grpc.StatusCode.INVALID_ARGUMENT),
        (4, grpc.StatusCode.INVALID_ARGUMENT),
        (6, grpc.StatusCode.RESOURCE_EXHAUSTED),  # too big to send: failed client-side
    ]
    assert isinstance(err, ClipSearchError) and "3 of 7 items failed" in str(err)
    vectors = err.vectors
    assert vectors is not None and vectors.shape == (7, DIM)
    assert np.isnan(vectors[[1, 4, 6]]).all()
    for i in (0, 2, 3, 5):
        np.testing.assert_array_equal(vectors[i], _text_vector(texts[i]))
    sent = [t for r in service.calls("EmbedTexts") for t in r.texts]
    assert "huge" * 5000 not in sent


def test_embed_images_accepts_paths_bytes_and_pil(fake, tmp_path: Path) -> None:
    image_mod = pytest.importorskip("PIL.Image")
    service, target = fake
    path = tmp_path / "one.png"
    path.write_bytes(PNG_HEAD)
    cmyk = image_mod.new("CMYK", (4, 4))  # PNG cannot hold CMYK: the client converts it
    with Client(target) as client:
        out = client.embed_images([str(path), path, JPEG_HEAD, image_mod.new("RGB", (3, 3)), cmyk])
    assert out.shape == (5, DIM)
    (request,) = service.calls("EmbedImages")
    assert request.images[0] == PNG_HEAD and request.images[2] == JPEG_HEAD
    assert sniff_image(request.images[3]) == "png"
    assert sniff_image(request.images[4]) == "png"


def test_rpc_error_becomes_clipsearch_error(fake) -> None:
    _, target = fake
    with Client(target) as client:
        with pytest.raises(ClipSearchError) as exc:
            client.count("nope")
        assert exc.value.code == grpc.StatusCode.NOT_FOUND
        assert exc.value.details == "no collection 'nope'"
        assert str(exc.value) == "NOT_FOUND: no collection 'nope'"
        assert not isinstance(exc.value, BatchError)
        with pytest.raises(ClipSearchError) as exc:
            client.create_collection("taken")
        assert exc.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_unreachable_server_is_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=5) as client, pytest.raises(ClipSearchError) as exc:
        client.info()
    assert exc.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_upsert_get_delete_roundtrip(fake) -> None:
    service, target = fake
    with Client(target, batch_size=2) as client:
        written = client.upsert(
            "c",
            ids=["a", "b", "c"],
            vectors=np.eye(3, DIM),
            metadata=[{"k": 1}, None, {"tag": "x"}],
        )
        assert written == 3
        # two requests in flight at once (pipeline=2) may reach the server in either order
        assert sorted(len(r.items) for r in service.calls("UpsertItems")) == [1, 2]
        stored = service.items["a"]
        np.testing.assert_array_equal(decode_vector(stored.vector), np.eye(3, DIM)[0])

        records = client.get("c", ["c", "missing", "a"], include_vectors=True)
        assert [r.id for r in records] == ["c", "a"]
        assert records[0].metadata == {"tag": "x"} and records[1].metadata == {"k": 1.0}
        assert records[0].vector is not None and records[0].vector.shape == (DIM,)
        assert client.get("c", ["b"])[0].vector is None

        assert client.delete("c", ["a", "zzz"]) == 1
        assert client.count("c") == 2


def test_upsert_partial_failure_raises_after_all_batches(fake, tmp_path: Path) -> None:
    service, target = fake
    paths = []
    for i, data in enumerate([PNG_HEAD, b"text", JPEG_HEAD, b"more text", PNG_HEAD]):
        paths.append(tmp_path / f"{i}.bin")
        paths[-1].write_bytes(data)
    with Client(target, batch_size=2) as client, pytest.raises(BatchError) as exc:
        client.upsert("c", ids=[f"id{i}" for i in range(5)], images=paths)
    assert [f.index for f in exc.value.errors] == [1, 3]
    assert exc.value.upserted == 3 and exc.value.vectors is None
    assert sorted(service.items) == ["id0", "id2", "id4"]
    assert len(service.calls("UpsertItems")) == 3  # kept going after the failing batch


def test_search_decodes_hits(fake, tmp_path: Path) -> None:
    service, target = fake
    with Client(target) as client:
        hits = client.search("c", text="a dog", k=2, include_vectors=True)
        assert [(h.id, round(h.score, 4)) for h in hits] == [("first", 0.9), ("second", 0.5)]
        assert hits[0].metadata == {"path": "p/1.png"} and hits[1].metadata == {}
        assert hits[0].vector is not None and hits[1].vector is None
        client.search("c", vector=np.ones(DIM), k=1)
        client.search("c", id="first", ef=64)
        client.search("c", image=JPEG_HEAD)
    kinds = [r.WhichOneof("query") for r in service.calls("Search")]
    assert kinds == ["text", "vector", "id", "image"]
    assert service.calls("Search")[2].ef == 64


def test_collections_and_info(fake) -> None:
    _, target = fake
    with Client(target) as client:
        created = client.create_collection("new", m=8, ef_construction=100)
        assert created == CollectionInfo("new", 0, DIM, "fp", 8, 100, 1.5)
        assert [c.name for c in client.collections()] == ["c"]
        assert client.drop_collection("c") is True
        assert client.drop_collection("other") is False
        info = client.info()
        assert (info.model, info.dim, info.random_weights, info.max_k) == ("ViT-B-32", 4, True, 100)


# --------------------------------------------------------------------------------------------
# Argument validation: nothing reaches the server


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.upsert("c", ids=["a"], texts=["t"], images=[PNG_HEAD]),
        lambda c: c.upsert("c", ids=["a"]),
        lambda c: c.upsert("c", ids=["a", "b"], texts=["t"]),
        lambda c: c.upsert("c", ids=["a"], texts=["t"], metadata=[{}, {}]),
        lambda c: c.upsert("c", ids=["a", "b"], vectors=np.ones((3, DIM))),
        lambda c: c.upsert("c", ids=["a"], vectors=np.ones(DIM)),
        lambda c: c.upsert("c", ids=["a"], vectors=[[1.0, float("nan")]]),
        lambda c: c.search("c"),
        lambda c: c.search("c", text="x", id="y"),
        lambda c: c.search("c", text="x", k=0),
    ],
)
def test_value_errors_before_any_call(fake, call) -> None:
    service, target = fake
    with Client(target) as client, pytest.raises(ValueError):
        call(client)
    assert service.requests == []


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.upsert("c", ids="abc", texts=["a", "b", "c"]),
        lambda c: c.upsert("c", ids=["a", 2], texts=["a", "b"]),
        lambda c: c.upsert("c", ids=["a"], texts=["t"], metadata=[{"x": object()}]),
        lambda c: c.upsert("c", ids=["a", "b"], images=[PNG_HEAD, 42]),
        lambda c: c.embed_texts("one string"),
        lambda c: c.embed_texts(["ok", 3]),
        lambda c: c.embed_images(PNG_HEAD),
        lambda c: c.delete("c", "abc"),
    ],
)
def test_type_errors_before_any_call(fake, call) -> None:
    service, target = fake
    with Client(target) as client, pytest.raises(TypeError):
        call(client)
    assert service.requests == []


def test_missing_image_file_fails_before_any_call(fake, tmp_path: Path) -> None:
    service, target = fake
    with Client(target) as client, pytest.raises(FileNotFoundError):
        client.upsert("c", ids=["a", "b"], images=[PNG_HEAD, tmp_path / "absent.png"])
    assert service.requests == []


# --------------------------------------------------------------------------------------------
# Command line


def test_cli_index_reports_and_skips(fake, tmp_path: Path, capsys) -> None:
    service, target = fake
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(PNG_HEAD)
    (tmp_path / "a.jpg").write_bytes(JPEG_HEAD)
    (tmp_path / "readme.txt").write_text("hello")
    (tmp_path / "c.gif").write_bytes(b"GIF89a" + b"\x00" * 12)
    rc = cli.main(["--server", target, "index", str(tmp_path), "--collection", "c", "-v"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert sorted(service.items) == ["a.jpg", "c.gif", "sub/b.png"]
    assert struct_to_metadata(service.items["sub/b.png"].metadata) == {"path": "sub/b.png"}
    assert "indexed 3, skipped 1 not images, failed 0" in out
    assert "not an image: readme.txt" in err


def test_cli_index_reports_server_item_errors(fake, tmp_path: Path, capsys) -> None:
    service, target = fake
    (tmp_path / "good.png").write_bytes(PNG_HEAD)
    (tmp_path / "broken.png").write_bytes(PNG_HEAD)
    service.reject_ids.add("broken.png")
    rc = cli.main(["--server", target, "index", str(tmp_path), "--collection", "c"])
    out, err = capsys.readouterr()
    assert rc == 1  # a file failed: scripts must see it; the summary line stays
    assert "indexed 1, skipped 0 not images, failed 1" in out
    assert "failed: broken.png: INVALID_ARGUMENT: bad image" in err


def test_cli_index_all_failed_exits_1(fake, tmp_path: Path, capsys) -> None:
    _, target = fake
    (tmp_path / "x.png").write_bytes(PNG_HEAD)
    rc = cli.main(["--server", target, "index", str(tmp_path), "--collection", "forbidden"])
    assert rc == 1
    assert "error: PERMISSION_DENIED: no writing here" in capsys.readouterr().err


def test_cli_search_prints_ranked_table(fake, capsys) -> None:
    service, target = fake
    rc = cli.main(["--server", target, "search", "--collection", "c", "a red car", "-k", "2"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0].split() == ["rank", "score", "id", "metadata"]
    assert out[1].split() == ["1", "0.9000", "first", '{"path":"p/1.png"}']
    assert out[2].split() == ["2", "0.5000", "second", "{}"]
    assert service.calls("Search")[0].text == "a red car"


@pytest.mark.parametrize(
    "argv",
    [["search", "--collection", "c"], ["search", "--collection", "c", "txt", "--id", "x"]],
)
def test_cli_search_needs_exactly_one_query(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


def test_cli_info_and_collections(fake, capsys) -> None:
    _, target = fake
    assert cli.main(["--server", target, "info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split(":", 1)[0].strip() == "model" and "ViT-B-32" in line for line in lines)
    assert len({line.index(":") for line in lines}) == 1  # aligned
    assert cli.main(["--server", target, "collections"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "count", "dim", "model", "fingerprint"]
    assert out[1].split() == ["c", "0", "4", "fp"]


def test_cli_server_from_environment(fake, monkeypatch, capsys) -> None:
    _, target = fake
    monkeypatch.setenv("CLIPSEARCH_SERVER", target)
    assert cli.main(["info"]) == 0
    assert target in capsys.readouterr().out


def test_cli_connection_failure_exits_1(capsys) -> None:
    rc = cli.main(["--server", "127.0.0.1:1", "--timeout", "5", "collections"])
    assert rc == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_serve_passes_every_argument(monkeypatch) -> None:
    received: list[list[str]] = []
    app = types.ModuleType("clipsearch_server.app")
    app.main = lambda args: received.append(args) or 0  # type: ignore[attr-defined]
    launch = types.ModuleType("clipsearch_server.launch")
    launch.with_huge_pages = lambda tail: None  # type: ignore[attr-defined]
    launch.check_settings = lambda args: None  # type: ignore[attr-defined]
    package = types.ModuleType("clipsearch_server")
    package.app, package.launch = app, launch  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "clipsearch_server", package)
    monkeypatch.setitem(sys.modules, "clipsearch_server.app", app)
    monkeypatch.setitem(sys.modules, "clipsearch_server.launch", launch)
    assert cli.main(["serve", "--help"]) == 0
    assert cli.main(["--server", "h:1", "serve", "--port", "5", "-v"]) == 0
    assert received == [["--help"], ["--port", "5", "-v"]]


def test_cli_serve_without_server(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "clipsearch_server", None)
    assert cli.main(["serve"]) == 2
    assert (
        "the server is not installed: pip install 'clipsearch[server]'" in capsys.readouterr().err
    )


def test_cli_version(capsys) -> None:
    import clipsearch

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"clipsearch {clipsearch.__version__}\n"


def test_item_failure_is_plain_data() -> None:
    failure = ItemFailure(3, grpc.StatusCode.INVALID_ARGUMENT, "bad")
    assert failure == ItemFailure(3, grpc.StatusCode.INVALID_ARGUMENT, "bad")
    err = BatchError([failure], 10)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.errors == [failure]
