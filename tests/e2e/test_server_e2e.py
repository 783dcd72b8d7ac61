"""End to end: a real server process with the tiny checkpoint, driven through the client."""

from __future__ import annotations

import io
import itertools
import signal
import uuid

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from clipsearch import BatchError, Client, ClipSearchError
from clipsearch_server.encoders.local.precision import choose_precision
from conftest import TEST_DEVICE, Engine, ServerProcess, coco_images, save_tiny_checkpoint


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def server(engine: Engine, tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """This module's API tests run on every engine combination (conftest.BACKENDS)."""
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("server") / "data",
                         *engine.args).start()
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        assert proc.stop() == 0, proc.log()


def test_info_describes_the_loaded_checkpoint(client: Client, engine: Engine,
                                              tiny_checkpoint) -> None:
    info = client.info()
    assert info.model == "clipsearch-tiny"
    assert info.checkpoint == str(tiny_checkpoint)
    assert info.dim == 64
    assert info.device == TEST_DEVICE
    if engine.name.startswith("ray"):  # the replicas' model flags decide: fp32 (conftest)
        assert (info.precision, info.precision_reason) == ("fp32", "--precision fp32 was asked for")
        return
    # The default, --precision auto, says what it picked for this device and why.
    chosen, reason = choose_precision("auto", torch.device(TEST_DEVICE))
    assert (info.precision, info.precision_reason) == (chosen, reason)
    assert info.precision in ("bf16", "fp32") and info.precision_reason.startswith("auto:")
    assert not info.random_weights
    assert info.model_fingerprint.startswith("clipsearch-tiny/sha256:")


def test_embeddings_are_unit_length_per_modality(client: Client) -> None:
    texts = client.embed_texts(["a dog on a beach", "a red car"])
    images = client.embed_images(coco_images(3))
    assert texts.shape == (2, 64) and images.shape == (3, 64)
    assert texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)


def test_batch_reports_bad_items_without_failing_neighbours(client: Client) -> None:
    good = coco_images(2)
    with pytest.raises(BatchError) as caught:
        client.embed_images([good[0], b"definitely not an image", good[1]])
    err = caught.value
    assert [e.index for e in err.errors] == [1]
    assert err.errors[0].code == grpc.StatusCode.INVALID_ARGUMENT
    assert np.isfinite(err.vectors[[0, 2]]).all()
    np.testing.assert_allclose(err.vectors[[0, 2]], client.embed_images(good), atol=1e-6)


def test_coco_each_image_finds_itself_first(client: Client, engine: Engine) -> None:
    files = coco_images()
    name = unique("coco")
    ids = [f"{f.parent.name}/{f.name}" for f in files]
    written = client.upsert(name, ids=ids, images=files,
                            metadata=[{"file": f.name, "split": f.parent.name} for f in files])
    assert written == len(files) == client.count(name)
    # A query image runs alone and an upload in batches; in bf16 the kernels of different
    # batch sizes round differently. Each is within cosine 0.999 of fp32 (bf16's stated
    # tolerance), so the two are within twice that angle: cosine 2 * 0.999^2 - 1 = 0.996.
    same = 4e-3 if client.info().precision == "bf16" else 1e-4
    for id_, f in zip(ids, files, strict=True):
        by_bytes = client.search(name, image=f.read_bytes(), k=5)
        assert by_bytes[0].id == id_
        assert by_bytes[0].score == pytest.approx(1.0, abs=same)
        assert by_bytes[0].metadata == {"file": f.name, "split": f.parent.name}
        by_id = client.search(name, id=id_, k=5)
        assert by_id[0].id == id_
    text_hits = client.search(name, text="a photo of a dog", k=7)
    assert len(text_hits) == 7
    assert all(a.score >= b.score for a, b in itertools.pairwise(text_hits))
    if not engine.name.startswith("ray"):  # a Ray front has no model to measure
        # The towers' measured speed and the bulk batch size chosen from it.
        image = client.info().towers["image"]
        assert image.batch_size in (1, 2, 4, 8, 16, 32, 64) and image.inputs_per_second > 0
        assert f" {image.batch_size}: " in image.reason.replace("{", " ")  # it was measured
        assert client.info().backend == "torch"


def test_upsert_replaces_and_delete_removes(client: Client) -> None:
    name = unique("crud")
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(20, 64)).astype(np.float32)
    ids = [f"v{i}" for i in range(20)]
    client.upsert(name, ids=ids, vectors=vectors, metadata=[{"n": i} for i in range(20)])
    assert client.count(name) == 20

    replacement = rng.normal(size=(1, 64)).astype(np.float32)
    client.upsert(name, ids=["v3"], vectors=replacement, metadata=[{"n": 333}])
    assert client.count(name) == 20
    [record] = client.get(name, ["v3"], include_vectors=True)
    unit = replacement[0] / np.linalg.norm(replacement)
    np.testing.assert_allclose(record.vector, unit, atol=1e-6)
    assert record.metadata == {"n": 333}
    assert client.search(name, vector=replacement[0], k=1)[0].id == "v3"
    assert client.search(name, vector=vectors[3], k=1)[0].id != "v3"

    assert client.delete(name, ["v3", "v4", "never-existed"]) == 2
    assert client.delete(name, ["v3"]) == 0  # idempotent
    assert client.count(name) == 18
    assert client.get(name, ["v3", "v4"]) == []
    hits = client.search(name, vector=replacement[0], k=20)
    assert {h.id for h in hits} == set(ids) - {"v3", "v4"}

    # a deleted id can come back
    client.upsert(name, ids=["v4"], vectors=vectors[4:5])
    assert client.search(name, vector=vectors[4], k=1)[0].id == "v4"


def test_text_upsert_and_text_to_text_search(client: Client) -> None:
    name = unique("texts")
    texts = ["a dog", "a cat", "an airplane in the sky", "a bowl of soup"]
    client.upsert(name, ids=[f"t{i}" for i in range(4)], texts=texts)
    for i, text in enumerate(texts):
        assert client.search(name, text=text, k=1)[0].id == f"t{i}"


def test_collections_create_list_info_drop(client: Client) -> None:
    name = unique("admin")
    info = client.create_collection(name, m=8, ef_construction=50)
    assert (info.name, info.count, info.dim, info.m, info.ef_construction) == (name, 0, 64, 8, 50)
    with pytest.raises(ClipSearchError) as caught:
        client.create_collection(name)
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert name in [c.name for c in client.collections()]
    assert client.collection(name).model_fingerprint == client.info().model_fingerprint
    assert client.drop_collection(name) is True
    assert client.drop_collection(name) is False
    with pytest.raises(ClipSearchError) as caught:
        client.count(name)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def _png_bytes(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("1", size).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda c, n: c.embed_images([b"\xff\xd8\xff\xe0corrupt jpeg"]), "INVALID_ARGUMENT"),
        (lambda c, n: c.embed_images([b"hello, I am a text file\n" * 20]), "INVALID_ARGUMENT"),
        (lambda c, n: c.embed_images([_png_bytes((30_000, 30_000))]), "INVALID_ARGUMENT"),
        (lambda c, n: c.embed_texts([""]), "INVALID_ARGUMENT"),
        (lambda c, n: c.embed_texts(["   "]), "INVALID_ARGUMENT"),
        (lambda c, n: c.search(n, vector=np.ones(63, np.float32)), "INVALID_ARGUMENT"),
        (lambda c, n: c.search(n, vector=np.zeros(64, np.float32)), "INVALID_ARGUMENT"),
        (lambda c, n: c.upsert(n, ids=["x"], vectors=np.ones((1, 65), np.float32)),
         "INVALID_ARGUMENT"),
        (lambda c, n: c.search("no-such-collection", text="x"), "NOT_FOUND"),
        (lambda c, n: c.search(n, id="no-such-id"), "NOT_FOUND"),
        (lambda c, n: c.search(n, text="dog", k=10**9), "INVALID_ARGUMENT"),
        (lambda c, n: c.search(n, text="dog", k=5, ef=10**9), "INVALID_ARGUMENT"),
        (lambda c, n: c.create_collection("bad/name"), "INVALID_ARGUMENT"),
        (lambda c, n: c.upsert(n, ids=[""], vectors=np.ones((1, 64), np.float32)),
         "INVALID_ARGUMENT"),
    ],
)
def test_bad_input_gets_the_right_status_and_server_keeps_serving(
    client: Client, call, code: str
) -> None:
    name = "bad-input"
    client.upsert(name, ids=["anchor"], vectors=np.ones((1, 64), np.float32))
    with pytest.raises(ClipSearchError) as caught:
        call(client, name)
    assert caught.value.code == grpc.StatusCode[code], caught.value
    assert client.count(name) == 1
    assert client.info().dim == 64


def test_errors_name_the_offending_field(client: Client) -> None:
    client.upsert("fields", ids=["a"], vectors=np.ones((1, 64), np.float32))
    for call, field in ((lambda: client.search("fields", text="x", k=10**9), "k"),
                        (lambda: client.search("fields", text="x", ef=10**9), "ef"),
                        (lambda: client.search("fields", vector=np.ones(3)), "vector"),
                        (lambda: client.list_page("fields", page_token="!"), "page_token")):
        with pytest.raises(ClipSearchError) as caught:
            call()
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in caught.value.field_violations] == [field]


def test_message_over_the_limit_is_resource_exhausted(server: ServerProcess) -> None:
    # A raw stub: the client would split this upload, the point is the server's own limit.
    from clipsearch.v1 import clipsearch_pb2 as pb
    from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address, options=[
        ("grpc.max_send_message_length", 200 << 20)]) as channel:
        stub = pb_grpc.ClipSearchServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.EmbedImages(pb.EmbedImagesRequest(images=[b"\0" * (65 << 20)]), timeout=60)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).dim == 64


def test_malformed_vectors_the_client_would_refuse(server: ServerProcess) -> None:
    from clipsearch.v1 import clipsearch_pb2 as pb
    from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

    nan = np.full(64, np.nan, np.float32).tobytes()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClipSearchServiceStub(channel)
        stub.UpsertItems(pb.UpsertItemsRequest(collection="raw", items=[
            pb.Item(id="ok", vector=pb.Vector(data=np.ones(64, "<f4").tobytes(), dim=64))]))
        for vector in (pb.Vector(data=nan, dim=64), pb.Vector(data=b"\0" * 12, dim=64)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Search(pb.SearchRequest(collection="raw", vector=vector, k=1), timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            reply = stub.UpsertItems(pb.UpsertItemsRequest(
                collection="raw", items=[pb.Item(id="bad", vector=vector)]), timeout=10)
            assert reply.upserted == 0
            assert [e.code for e in reply.errors] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]]
        for request in (pb.SearchRequest(collection="raw", k=1),  # no query
                        pb.SearchRequest(collection="raw", text="a dog", k=0)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Search(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stub.CountItems(pb.CountItemsRequest(collection="raw")).count == 1


def test_health_and_reflection_work_without_our_stubs(server: ServerProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "clipsearch.v1.ClipSearchService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "clipsearch.v1.ClipSearchService" in database.get_services()
        described = database.FindFileContainingSymbol("clipsearch.v1.ClipSearchService")
        assert "Search" in [m.name for m in described.service[0].method]


def test_a_ray_milvus_front_does_not_map_libtorch(server: ServerProcess, engine: Engine) -> None:
    """With both engines remote the front holds no model: torch never loads in it (issue 20)."""
    if engine.name != "ray+milvus":
        pytest.skip("this server runs the model in its own process")
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/maps") as maps:
        mapped = {line.split()[-1] for line in maps if "/" in line}
    torch_files = [path for path in mapped if "/torch/" in path or "libtorch" in path]
    assert torch_files == []


def test_everything_survives_a_restart(engine: Engine, tiny_checkpoint, tmp_path) -> None:
    first = ServerProcess(tiny_checkpoint, tmp_path / "data", *engine.args).start()
    files = coco_images(40)
    rng = np.random.default_rng(7)
    extra = rng.normal(size=(5, 64)).astype(np.float32)
    with Client(first.address) as c:
        c.upsert("photos", ids=[f.name for f in files], images=files,
                 metadata=[{"i": i} for i in range(len(files))])
        c.upsert("vectors", ids=[f"e{i}" for i in range(5)], vectors=extra)
        c.delete("photos", [files[0].name])
        c.upsert("photos", ids=[files[1].name], vectors=extra[:1], metadata=[{"replaced": True}])
        before = {h.id: h.score for h in c.search("photos", text="a kitchen", k=10)}
    assert first.stop() == 0, first.log()

    second = ServerProcess(tiny_checkpoint, tmp_path / "data", *engine.args).start()
    try:
        with Client(second.address) as c:
            assert sorted(x.name for x in c.collections()) == ["photos", "vectors"]
            assert c.count("photos") == len(files) - 1
            assert c.get("photos", [files[0].name]) == []
            [replaced] = c.get("photos", [files[1].name])
            assert replaced.metadata == {"replaced": True}
            for f in files[2:]:
                assert c.search("photos", image=f, k=1)[0].id == f.name
            after = {h.id: h.score for h in c.search("photos", text="a kitchen", k=10)}
            assert after.keys() == before.keys()
            assert c.search("vectors", vector=extra[2], k=1)[0].id == "e2"
    finally:
        assert second.stop() == 0, second.log()
    assert "loaded snapshot" in second.log() or not engine.local_store


def test_acknowledged_writes_survive_sigkill(engine: Engine, tiny_checkpoint, tmp_path) -> None:
    """No snapshot at all (killed, not stopped): the local index is rebuilt from the store;
    Milvus keeps what it acknowledged."""
    data = tmp_path / "data"
    first = ServerProcess(tiny_checkpoint, data, "--snapshot-interval-s", "3600",
                          *engine.args).start()
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(50, 64)).astype(np.float32)
    with Client(first.address) as c:
        c.upsert("kill", ids=[f"k{i}" for i in range(50)], vectors=vectors,
                 metadata=[{"i": i} for i in range(50)])
        c.delete("kill", ["k0"])
    first.stop(signal.SIGKILL)

    second = ServerProcess(tiny_checkpoint, data, *engine.args).start()
    try:
        with Client(second.address) as c:
            assert c.count("kill") == 49
            assert c.get("kill", ["k0"]) == []
            for i in (1, 25, 49):
                [hit] = c.search("kill", vector=vectors[i], k=1)
                assert (hit.id, hit.metadata) == (f"k{i}", {"i": float(i)})
    finally:
        assert second.stop() == 0, second.log()
    assert "rebuilding the index from the store" in second.log() or not engine.local_store


@pytest.mark.parametrize("store", ["local", "milvus"])
def test_a_collection_refuses_embeddings_from_another_model(store, tiny_checkpoint, tmp_path
                                                            ) -> None:
    engine = Engine(store)  # the other model is loaded in-process; the store keeps the mark
    other = save_tiny_checkpoint(tmp_path / "other.pt", 99)
    data = tmp_path / "data"
    first = ServerProcess(tiny_checkpoint, data, *engine.args).start()
    with Client(first.address) as c:
        c.upsert("fp", ids=["a", "b"], texts=["a dog", "a cat"])
        stored = c.get("fp", ["a"], include_vectors=True)[0].vector
    assert first.stop() == 0

    second = ServerProcess(other, data, *engine.args).start()
    try:
        with Client(second.address) as c:
            assert c.collection("fp").model_fingerprint != c.info().model_fingerprint
            for call in (lambda: c.search("fp", text="a dog"),
                         lambda: c.upsert("fp", ids=["c"], texts=["a bird"])):
                with pytest.raises(ClipSearchError) as caught:
                    call()
                assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert c.search("fp", vector=stored, k=1)[0].id == "a"  # raw vectors still work
            assert c.count("fp") == 2
    finally:
        assert second.stop() == 0, second.log()


def test_sigterm_drains_an_in_flight_upload(tiny_checkpoint, tmp_path) -> None:
    import time

    from clipsearch.v1 import clipsearch_pb2 as pb
    from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

    data = tmp_path / "data"
    files = coco_images(256)
    request = pb.UpsertItemsRequest(
        collection="drain", items=[pb.Item(id=f.name, image=f.read_bytes()) for f in files])
    # One decode thread and full-size decodes: the 256 photos take seconds to decode, so the
    # upload is still in flight when the signal comes, even on a quiet machine.
    proc = ServerProcess(tiny_checkpoint, data, "--decode-threads", "1",
                         "--no-jpeg-draft").start()
    with grpc.insecure_channel(proc.address, options=[
            ("grpc.max_send_message_length", 64 << 20)]) as channel:
        future = pb_grpc.ClipSearchServiceStub(channel).UpsertItems.future(request, timeout=60)
        time.sleep(0.4)  # sent over loopback and being decoded
        assert not future.done()
        proc.proc.send_signal(signal.SIGTERM)
        assert future.result().upserted == len(files)
    assert proc.wait() == 0, proc.log()
    assert "SIGTERM received" in proc.log()

    again = ServerProcess(tiny_checkpoint, data).start()
    try:
        with Client(again.address) as c:
            assert c.count("drain") == len(files)
    finally:
        assert again.stop() == 0


def test_filters_count_and_scroll_through_the_api(client: Client) -> None:
    name = unique("filtered")
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(250, 64)).astype(np.float32)
    client.upsert(name, ids=[f"p{i:03d}" for i in range(250)], vectors=vectors,
                  metadata=[{"album": "odd" if i % 2 else "even", "n": i} for i in range(250)])
    hits = client.search(name, vector=vectors[10], k=5, filter={"album": "odd"})
    assert len(hits) == 5 and all(h.metadata["album"] == "odd" for h in hits)
    assert hits[0].id != "p010"  # the nearest item is even: filtered out
    assert client.count(name, filter={"n": {"$gte": 200}}) == 50
    assert client.count(name) == 250
    few = client.search(name, vector=vectors[0], k=10, filter={"n": {"$lt": 3}})
    assert sorted(h.id for h in few) == ["p000", "p001", "p002"]

    page, token = client.list_page(name, page_size=100)
    assert [r.id for r in page] == [f"p{i:03d}" for i in range(100)] and token
    listed = list(client.scroll(name, page_size=64, filter={"album": "even"}))
    assert [r.id for r in listed] == [f"p{i:03d}" for i in range(0, 250, 2)]
    with pytest.raises(ClipSearchError) as caught:
        client.list_page(name, page_token="%%% not a token")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ClipSearchError) as caught:
        client.search(name, vector=vectors[0], filter={"n": {"$exists": True}},
                      k=5, ef=10**6)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    from clipsearch.v1 import clipsearch_pb2 as pb

    for bad in (pb.Filter(all_of=pb.FilterList()), pb.Filter(field=pb.FieldFilter(key="n"))):
        with pytest.raises(ClipSearchError) as caught:
            client.search(name, vector=vectors[0], filter=bad)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert client.count(name) == 250


def test_an_upload_whose_deadline_passes_writes_nothing(server: ServerProcess) -> None:
    import time

    from clipsearch.v1 import clipsearch_pb2 as pb
    from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

    files = coco_images(256)
    request = pb.UpsertItemsRequest(
        collection="deadline", items=[pb.Item(id=f.name, image=f.read_bytes()) for f in files])
    with grpc.insecure_channel(server.address, options=[
            ("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.ClipSearchServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.UpsertItems(request, timeout=0.15)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(3)  # let whatever the server had started run out
        # Decoding 256 photos outlasts the deadline: nothing is written, not even the
        # collection that the first write would have created.
        with pytest.raises(grpc.RpcError) as caught:
            stub.CountItems(pb.CountItemsRequest(collection="deadline"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
