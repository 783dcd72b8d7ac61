"""Thumbnails: made from upserted images, kept in the collection's database, returned on request."""

from __future__ import annotations

import io

import grpc
import pytest
from PIL import Image

from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc
from conftest import ServerProcess, coco_images


@pytest.fixture()
def stub(server: ServerProcess):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ClipSearchServiceStub(channel)


def _upsert_photos(stub, collection: str, n: int) -> list[str]:
    files = coco_images(n)
    items = [pb.Item(id=f.name, image=f.read_bytes()) for f in files]
    assert stub.UpsertItems(pb.UpsertItemsRequest(collection=collection, items=items)).upserted == n
    return [f.name for f in files]


def test_upserted_images_get_webp_thumbnails_on_request(stub) -> None:
    ids = _upsert_photos(stub, "thumbs", 3)
    plain = stub.GetItems(pb.GetItemsRequest(collection="thumbs", ids=ids))
    assert all(not item.thumbnail for item in plain.items)  # only when asked
    got = stub.GetItems(pb.GetItemsRequest(collection="thumbs", ids=ids, include_thumbnails=True))
    for item, path in zip(got.items, coco_images(3), strict=True):
        thumb = Image.open(io.BytesIO(item.thumbnail))
        assert thumb.format == "WEBP"
        original = Image.open(path)
        assert max(thumb.size) == min(256, max(original.size))
        # the aspect ratio is kept (within rounding)
        assert abs(thumb.size[0] / thumb.size[1] - original.size[0] / original.size[1]) < 0.02
    hits = stub.Search(pb.SearchRequest(collection="thumbs", id=ids[0], k=3,
                                        include_thumbnails=True)).hits
    assert len(hits) == 3 and all(h.thumbnail.startswith(b"RIFF") for h in hits)
    page = stub.ListItems(pb.ListItemsRequest(collection="thumbs", include_thumbnails=True))
    assert sorted(i.id for i in page.items) == sorted(ids)
    assert all(i.thumbnail for i in page.items)
    info = stub.GetCollection(pb.GetCollectionRequest(name="thumbs")).collection
    assert info.thumbnail_size == 256


def test_thumbnail_size_is_a_collection_setting(stub) -> None:
    created = stub.CreateCollection(pb.CreateCollectionRequest(name="small-thumbs",
                                                               thumbnail_size=64))
    assert created.collection.thumbnail_size == 64
    ids = _upsert_photos(stub, "small-thumbs", 1)
    item = stub.GetItems(pb.GetItemsRequest(collection="small-thumbs", ids=ids,
                                            include_thumbnails=True)).items[0]
    assert max(Image.open(io.BytesIO(item.thumbnail)).size) == 64

    stub.CreateCollection(pb.CreateCollectionRequest(name="no-thumbs", thumbnail_size=0))
    ids = _upsert_photos(stub, "no-thumbs", 1)
    item = stub.GetItems(pb.GetItemsRequest(collection="no-thumbs", ids=ids,
                                            include_thumbnails=True)).items[0]
    assert item.thumbnail == b""


def test_bad_thumbnail_size_is_refused(stub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateCollection(pb.CreateCollectionRequest(name="bad-thumbs", thumbnail_size=5000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "thumbnail_size" in err.value.details()


def test_replacing_with_a_vector_or_deleting_drops_the_thumbnail(stub) -> None:
    ids = _upsert_photos(stub, "thumbs-replace", 1)
    vector = pb.Vector(data=b"\x00\x00\x80\x3f" + b"\x00" * 4 * 63, dim=64)
    stub.UpsertItems(pb.UpsertItemsRequest(collection="thumbs-replace",
                                           items=[pb.Item(id=ids[0], vector=vector)]))
    item = stub.GetItems(pb.GetItemsRequest(collection="thumbs-replace", ids=ids,
                                            include_thumbnails=True)).items[0]
    assert item.thumbnail == b""


def test_cli_index_keeps_thumbnails_by_default(server: ServerProcess, stub, tmp_path) -> None:
    import shutil
    import subprocess
    import sys

    photos = tmp_path / "photos"
    photos.mkdir()
    for f in coco_images(2):
        shutil.copy(f, photos / f.name)
    for collection, extra, expect in (("cli-thumbs", [], 256),
                                      ("cli-no-thumbs", ["--thumbnail-size", "0"], 0)):
        result = subprocess.run(
            [sys.executable, "-m", "clipsearch", "--server", server.address, "index",
             str(photos), "--collection", collection, *extra],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        info = stub.GetCollection(pb.GetCollectionRequest(name=collection)).collection
        assert info.thumbnail_size == expect
        items = stub.ListItems(pb.ListItemsRequest(collection=collection,
                                                   include_thumbnails=True)).items
        assert len(items) == 2
        assert all(bool(i.thumbnail) == bool(expect) for i in items)
