"""Random requests to Recommend, Classify, FindDuplicates and Cluster (hypothesis, raw stubs):
each answers OK or a documented status code, never INTERNAL or a crash, and refused Cluster
calls write nothing."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc
from conftest import ServerProcess

DIM = 64
TARGET = "afuzz"
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.ClipSearchServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        s = pb_grpc.ClipSearchServiceStub(channel)
        rng = np.random.default_rng(0)
        v = rng.normal(size=(40, DIM)).astype("<f4")
        s.UpsertItems(pb.UpsertItemsRequest(collection=TARGET, items=[
            pb.Item(id=f"i{i}", vector=pb.Vector(data=v[i].tobytes(), dim=DIM))
            for i in range(40)]))
        yield s


def call(stub: pb_grpc.ClipSearchServiceStub, method: str, request: object) -> grpc.StatusCode:
    try:
        getattr(stub, method)(request, timeout=60)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, (method, exc.code(), exc.details(), request)
        return exc.code()


names = st.sampled_from([TARGET, "absent", "", "bad name!"])
ids = st.sampled_from(["i1", "i2", "i39", "ghost", "", "x" * 600])
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
vectors = st.builds(lambda dim, data: pb.Vector(dim=dim, data=data),
                    st.sampled_from([0, 3, DIM]),
                    st.one_of(st.binary(max_size=8),
                              st.just(np.ones(DIM, "<f4").tobytes()),
                              st.just(np.zeros(DIM, "<f4").tobytes()),
                              st.just(np.full(DIM, np.nan, "<f4").tobytes())))
examples = st.one_of(
    st.builds(lambda x: pb.Example(id=x), ids),
    st.builds(lambda x: pb.Example(text=x), st.text(max_size=20)),
    st.builds(lambda x: pb.Example(image=x), st.binary(max_size=64)),
    st.builds(lambda x: pb.Example(vector=x), vectors),
    st.just(pb.Example()),
)


@FUZZ
@given(names, st.lists(examples, max_size=4), st.lists(examples, max_size=3),
       st.integers(0, 3), st.integers(0, 2000), st.integers(0, 5000), st.none() | floats)
def test_recommend(stub, name, pos, neg, strategy, k, ef, weight) -> None:
    request = pb.RecommendRequest(collection=name, positives=pos, negatives=neg,
                                  strategy=strategy, k=k, ef=ef)
    if weight is not None:
        request.negative_weight = weight
    call(stub, "Recommend", request)


@FUZZ
@given(st.lists(st.one_of(st.builds(lambda b: pb.ClassifyInput(image=b), st.binary(max_size=64)),
                          st.builds(lambda i: pb.ClassifyInput(id=i), ids),
                          st.just(pb.ClassifyInput())), max_size=4),
       names, st.lists(st.text(max_size=12), max_size=6),
       st.lists(st.sampled_from(["a {}", "{}", "{} {}", "", "{x}", "{0.__class__}"]),
                max_size=3), st.integers(0, 50))
def test_classify(stub, inputs, name, labels, templates, top_n) -> None:
    call(stub, "Classify", pb.ClassifyRequest(inputs=inputs, collection=name, labels=labels,
                                              templates=templates, top_n=top_n))


@FUZZ
@given(names, st.none() | floats, st.integers(0, 200), st.integers(0, 5000),
       st.integers(0, 2000), st.sampled_from(["", "ZHVwOjE=", "garbage", "ZHVwOi0x"]))
def test_find_duplicates(stub, name, threshold, neighbours, ef, size, token) -> None:
    request = pb.FindDuplicatesRequest(collection=name, neighbors=neighbours, ef=ef,
                                       page_size=size, page_token=token)
    if threshold is not None:
        request.threshold = threshold
    call(stub, "FindDuplicates", request)


@FUZZ
@given(names, st.integers(0, 60), st.integers(0, 200), st.integers(0, 2**32 - 1),
       st.sampled_from(["", "theme", "a.b", "x" * 65, "ok-key_1"]))
def test_cluster(stub, name, n, top_n, seed, key) -> None:
    before = stub.ListItems(pb.ListItemsRequest(collection=TARGET, page_size=100))
    code = call(stub, "Cluster", pb.ClusterRequest(collection=name, n_clusters=n, top_n=top_n,
                                                   seed=seed, metadata_key=key))
    after = stub.ListItems(pb.ListItemsRequest(collection=TARGET, page_size=100))
    if code != grpc.StatusCode.OK or not key or name != TARGET:
        assert after == before  # refused (or read-only) calls change nothing
