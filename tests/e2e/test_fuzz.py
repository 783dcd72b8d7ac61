"""Property-based fuzzing of the gRPC API (hypothesis) against a real server process.

Random and mutated requests go through the raw generated stubs, so malformed input the Python
client would refuse locally still reaches the server: random bytes and damaged encodings as
images, huge and nested metadata, NaN vectors, hostile filters, out-of-range numbers. For every
call the properties are:

* the answer is OK or a documented status code (never INTERNAL, UNKNOWN, a hang or a crash);
* the server process is alive afterwards and answers GetServerInfo;
* a write the server refused changed nothing, an accepted one changed exactly what it said,
  and a read changed nothing.

The runs are derandomized, so CI sees the same examples every time.
"""

from __future__ import annotations

import base64
import io
import itertools
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import hypothesis.strategies as st
import numpy as np
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from PIL import Image

from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc
from conftest import ServerProcess

DIM = 64  # the tiny test model's embedding dimension
MAX_K = 1000
MAX_MESSAGE = 64 * 1024 * 1024
CALL_TIMEOUT = 30.0  # far above any honest answer from the tiny model: reaching it is a hang

TARGET = "fuzz-target"  # pre-filled; every write example must leave it as it found it
EMPTY = "fuzz-empty"
BASELINE_NAMES = frozenset({TARGET, EMPTY})
UNKNOWN_NAME = "no-such-collection"

Code = grpc.StatusCode
# The status codes the API documents. DEADLINE_EXCEEDED only answers a deadline the client set,
# and ours is never reached by a working server; UNAVAILABLE means it is shutting down.
ALLOWED = frozenset({Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS,
                     Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED})
ITEM_CODES = frozenset(c.value[0] for c in ALLOWED - {Code.OK})

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    # No explain phase: it replays each failure many times over, too slow against a server.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# --- failures -------------------------------------------------------------------------------
_BUG_TYPES: dict[str, type[AssertionError]] = {}


def bug(kind: str, message: str) -> AssertionError:
    """An AssertionError of a class named after the bug, so hypothesis reports each kind of
    failure (Search answering INTERNAL, Upsert answering UNKNOWN, ...) with its own example."""
    cls = _BUG_TYPES.setdefault(kind, type(kind, (AssertionError,), {}))
    return cls(message)


# --- test data --------------------------------------------------------------------------------
def _sample_images() -> dict[str, bytes]:
    """Small valid encodings of every accepted format and a few colour modes."""
    ys, xs = np.mgrid[0:16, 0:24]
    rgb = Image.fromarray(np.stack([xs * 10, ys * 15, (xs + ys) * 6], -1).astype(np.uint8))
    deep = Image.fromarray((ys * 4000 + xs).astype(np.uint16))
    cases = [("png", rgb, "PNG"), ("png-rgba", rgb.convert("RGBA"), "PNG"),
             ("png-16bit", deep, "PNG"), ("png-palette", rgb.convert("P"), "PNG"),
             ("jpeg", rgb, "JPEG"), ("jpeg-grey", rgb.convert("L"), "JPEG"),
             ("gif", rgb.convert("P"), "GIF"), ("bmp", rgb, "BMP"), ("tiff", rgb, "TIFF"),
             ("webp", rgb, "WEBP")]
    out = {}
    for name, img, fmt in cases:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out[name] = buf.getvalue()
    return out


SAMPLES = _sample_images()
MAGICS = [b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xd8\xff\xe0",
          b"GIF89a", b"GIF87a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 "]


def _claim_size(data: bytes, fmt: str, width: int, height: int) -> bytes:
    """Rewrite the picture size an encoding's header claims (the pixels stay as they are)."""
    b = bytearray(data)
    if fmt.startswith("png"):
        b[16:24] = struct.pack(">II", width & 0x7FFFFFFF, height & 0x7FFFFFFF)
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    elif fmt == "bmp":
        b[18:26] = struct.pack("<ii", width - 2**31, height - 2**31)
    elif fmt == "gif":
        b[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
        at = b.find(b"\x2c\x00\x00\x00\x00")
        if at > 0:
            b[at + 5:at + 9] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif fmt.startswith("jpeg"):
        at = b.find(b"\xff\xc0")
        if at > 0:
            b[at + 5:at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    elif fmt == "webp":
        b[26:30] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
    else:  # tiff: no fixed place; damage the first IFD entries instead
        b[8:16] = struct.pack("<II", width, height)
    return bytes(b)


@dataclass(frozen=True)
class Img:
    """An encoded image: a valid sample, then one kind of damage (described, so failing
    examples print readably)."""

    sample: str
    damage: str = "none"  # none, truncate, flip, size
    at: int = 0
    value: int = 0
    flips: tuple[tuple[int, int], ...] = ()

    def data(self) -> bytes:
        data = SAMPLES[self.sample]
        if self.damage == "truncate":
            return data[:self.at % len(data)]
        if self.damage == "flip":
            b = bytearray(data)
            for pos, xor in self.flips:
                b[pos % len(b)] ^= xor or 0xFF
            return bytes(b)
        if self.damage == "size":
            return _claim_size(data, self.sample, self.at, self.value)
        return data


@dataclass(frozen=True)
class Vec:
    """A wire vector described by how it is made: `length` float32 values (all `fill`, or
    seeded normal values), one of them optionally replaced by `poke`; or `raw` bytes."""

    dim: int
    fill: float = 0.0
    seed: int | None = None
    length: int = DIM
    poke: tuple[int, float] | None = None
    raw: bytes | None = None

    def values(self) -> np.ndarray:
        if self.raw is not None:
            return np.frombuffer(self.raw[:len(self.raw) // 4 * 4], dtype="<f4")
        if self.seed is None:
            values = np.full(self.length, self.fill, dtype=np.float32)
        else:
            values = np.random.default_rng(self.seed).normal(size=self.length).astype(np.float32)
        if self.poke is not None and self.length:
            values[self.poke[0] % self.length] = self.poke[1]
        return values

    def message(self) -> pb.Vector:
        data = self.raw if self.raw is not None else self.values().astype("<f4").tobytes()
        return pb.Vector(data=data, dim=self.dim)


def image_bytes(image: Img | bytes) -> bytes:
    return image.data() if isinstance(image, Img) else image


# --- strategies -------------------------------------------------------------------------------
u32 = st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 130),
                st.sampled_from([0, 1, 2, 128, 129, 1000, 1001, 4096, 4097, 2**31, 2**32 - 1]))
f32 = st.floats(width=32)

valid_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)
odd_names = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["", " ", ".", "..", "../escape", ".hidden", "-dash", "_under", "a/b",
                     "a\\b", "a\x00b", "\u00e9t\u00e9", "A" * 64, "A" * 65, "con", "nul"]),
    st.builds(lambda n: "x" * n, st.integers(60, 5000)),
)
# Weighted towards the pre-filled collection, where requests get furthest.
collection_args = st.one_of(st.just(TARGET), st.just(TARGET), st.just(TARGET),
                            st.sampled_from([EMPTY, UNKNOWN_NAME]), valid_names, odd_names)

BASE_IDS = [f"item-{i:02d}" for i in range(17)] + ["\u00fcn\u00efc\u00f6d\u00e9", "with space",
                                                  'quote"id']
item_ids = st.one_of(
    st.sampled_from(BASE_IDS),
    st.text(max_size=20),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\U0001f436", "\u202e", "%s", "'; DROP"]),
    st.builds(lambda n: "x" * n, st.integers(505, 520)),
    st.builds(lambda a, b: a + "\x00" + b, st.text(max_size=5), st.text(max_size=5)),
)

texts = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["", " ", "\t\n ", "\x00", "a photo of a dog", "\u200b", "\U0001f436" * 80,
                     "<|endoftext|>", "\ufeff", "\u3000"]),
    # around the 10,000-character limit, and long token sequences
    st.builds(lambda c, n: c * n, st.characters(), st.integers(9_990, 10_010)),
    st.builds(lambda c, n: c * n, st.characters(), st.integers(1, 3000)),
)

images = st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda magic, tail: magic + tail, st.sampled_from(MAGICS), st.binary(max_size=512)),
    st.builds(Img, sample=st.sampled_from(sorted(SAMPLES))),
    st.builds(Img, sample=st.sampled_from(sorted(SAMPLES)), damage=st.just("truncate"),
              at=st.integers(0, 4096)),
    st.builds(Img, sample=st.sampled_from(sorted(SAMPLES)), damage=st.just("flip"),
              flips=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)),
                             min_size=1, max_size=8).map(tuple)),
    st.builds(Img, sample=st.sampled_from(sorted(SAMPLES)), damage=st.just("size"),
              at=st.integers(0, 2**32 - 1) | st.integers(0, 70_000),
              value=st.integers(0, 2**32 - 1) | st.integers(0, 70_000)),
)

seeds = st.integers(0, 2**32 - 1)
vectors = st.one_of(
    st.builds(Vec, dim=st.just(DIM), seed=seeds),
    st.builds(Vec, dim=st.just(DIM), seed=seeds, poke=st.tuples(st.integers(0, DIM - 1), f32)),
    st.builds(Vec, dim=st.just(DIM), fill=f32 | st.sampled_from([0.0, 1e-45, 3e38, math.nan])),
    st.builds(Vec, dim=u32 | st.sampled_from([DIM - 1, DIM + 1]), seed=seeds,
              length=st.integers(0, 2 * DIM + 2)),
    st.builds(Vec, dim=u32 | st.just(DIM), raw=st.binary(max_size=4 * DIM + 8)),
)

json_keys = st.one_of(st.text(max_size=12),
                      st.sampled_from(["", ".", "a.b", 'q"k', "\x00", "$", "exif", "n", "tag"]))
json_scalars = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=20),
                         st.integers(-(2**53), 2**53))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys, inner, max_size=4),
    max_leaves=12)


def nested(depth: int) -> dict:
    """{"a": {"a": ... {}}} nested `depth` objects deep."""
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


metadata_values = st.one_of(
    st.none(),  # unset
    st.dictionaries(json_keys, json_values, max_size=6),
    st.builds(nested, st.integers(1, 150)),
    st.builds(lambda n: {f"k{i}": i for i in range(n)}, st.integers(0, 8000)),
    st.builds(lambda n: {"s": "x" * n}, st.integers(60_000, 70_000)),
    st.builds(lambda k, x: {k: x}, json_keys, st.sampled_from([math.nan, math.inf, -math.inf])),
)

queries = st.one_of(
    st.tuples(st.just("text"), texts),
    st.tuples(st.just("image"), images),
    st.tuples(st.just("vector"), vectors),
    st.tuples(st.just("id"), item_ids),
    st.none(),
)


def _value(kind: str, x: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    if kind == "string":
        value.string_value = x
    elif kind == "number":
        value.number_value = x
    elif kind == "bool":
        value.bool_value = x
    elif kind == "null":
        value.null_value = struct_pb2.NULL_VALUE
    elif kind == "struct":
        value.struct_value.update(x)
    else:
        value.list_value.extend(x)
    return value


scalar_values = st.one_of(
    st.builds(_value, st.just("string"), st.text(max_size=10) | st.sampled_from(["red", "cam1"])),
    st.builds(_value, st.just("number"), st.floats() | st.integers(0, 20)),
    st.builds(_value, st.just("bool"), st.booleans()),
    st.builds(_value, st.just("null"), st.none()),
)
filter_values = st.one_of(
    scalar_values, scalar_values,
    st.just(struct_pb2.Value()),  # no kind set
    st.builds(_value, st.just("struct"), st.dictionaries(json_keys, json_scalars, max_size=3)),
    st.builds(_value, st.just("list"), st.lists(json_scalars, max_size=3)),
)
filter_keys = st.one_of(
    st.sampled_from(["n", "tag", "exif.camera", "exif", "t", "flag", "none", 'q"k', "missing",
                     "", ".", "a..b", ".n", "n.", "x\x00y", "$.n", "n[0]", "*", "'", "\\",
                     "k" * 256, "k" * 257]),
    st.text(max_size=20),
    st.text(alphabet="n.\"'$[]*\\\x00 ", max_size=8),
    st.builds(lambda a, b: a + "\x00" + b, st.text(max_size=4), st.text(max_size=4)),
)
timestamps = st.builds(timestamp_pb2.Timestamp,
                       seconds=st.integers(-(2**63), 2**63 - 1) | st.integers(-10**11, 10**11),
                       nanos=st.integers(-(2**31), 2**31 - 1) | st.integers(0, 10**9))
bounds = st.none() | st.floats() | st.integers(-10, 30).map(float)


def _range(gt: float | None, gte: float | None, lt: float | None, lte: float | None
           ) -> pb.NumberRange:
    return pb.NumberRange(**{k: v for k, v in
                             (("gt", gt), ("gte", gte), ("lt", lt), ("lte", lte)) if v is not None})


def _time_range(bounds: dict[str, timestamp_pb2.Timestamp]) -> pb.TimeRange:
    rng = pb.TimeRange()
    for name, ts in bounds.items():
        getattr(rng, name).CopyFrom(ts)
    return rng


def _field(key: str, condition: tuple[str, Any] | None) -> pb.Filter:
    f = pb.Filter()
    f.field.key = key
    if condition is None:
        f.field.SetInParent()
        return f
    kind, arg = condition
    if kind == "exists":
        f.field.exists = arg
    elif kind == "one_of":
        f.field.one_of.SetInParent()
        f.field.one_of.values.extend(arg)
    else:
        getattr(f.field, kind).CopyFrom(arg)
    return f


conditions = st.one_of(
    st.none(),
    st.tuples(st.just("equals"), filter_values),
    st.tuples(st.just("equals"), scalar_values),
    st.tuples(st.just("one_of"), st.lists(filter_values, max_size=5)),
    st.tuples(st.just("one_of"), st.lists(scalar_values, min_size=1, max_size=5)),
    st.tuples(st.just("exists"), st.booleans()),
    st.tuples(st.just("range"), st.builds(_range, bounds, bounds, bounds, bounds)),
    st.tuples(st.just("time_range"), st.builds(_time_range, st.dictionaries(
        st.sampled_from(["gt", "gte", "lt", "lte"]), timestamps, max_size=4))),
    st.tuples(st.just("exists"), st.booleans()),
)
leaf_filters = st.builds(_field, filter_keys, conditions)
list_kinds = st.sampled_from(["all_of", "any_of", "none_of"])


def _group(kind: str, children: list[pb.Filter]) -> pb.Filter:
    f = pb.Filter()
    getattr(f, kind).SetInParent()
    getattr(f, kind).filters.extend(children)
    return f


def _chain(kind: str, depth: int, leaf: pb.Filter) -> pb.Filter:
    """`depth` nested one-child groups around a leaf, built in place (no copy limit)."""
    root = pb.Filter()
    node = root
    for _ in range(depth):
        node = getattr(node, kind).filters.add()
    node.CopyFrom(leaf)
    return root


filter_trees = st.recursive(
    leaf_filters | st.just(pb.Filter()),
    lambda inner: st.builds(_group, list_kinds, st.lists(inner, max_size=4)),
    max_leaves=16)

def _numbers(n: int) -> list[struct_pb2.Value]:
    return [_value("number", float(i)) for i in range(n)]


filters = st.one_of(
    st.none(),
    filter_trees, filter_trees,
    st.builds(_chain, list_kinds, st.integers(10, 70), leaf_filters),
    st.builds(lambda kind, n, leaf: _group(kind, [leaf] * n),
              list_kinds, st.integers(200, 300), leaf_filters),
    # one_of up to and past its 1024-value limit (alone: big value lists make SQL slow to plan)
    st.builds(_field, st.sampled_from(["n", "tag"]),
              st.tuples(st.just("one_of"), st.builds(_numbers, st.integers(100, 1100)))),
)


# --- calls and state ----------------------------------------------------------------------------
def rpc(stub: pb_grpc.ClipSearchServiceStub, method: str, request: Any) -> tuple[Code, Any]:
    """Call a method; fail on an undocumented status code, return (code, reply or None)."""
    try:
        return Code.OK, getattr(stub, method)(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as exc:
        code = exc.code()
        if code not in ALLOWED:
            raise bug(f"{method}_answers_{code.name}",
                      f"{method} answered {code.name}: {exc.details()}") from None
        return code, None


def must(stub: pb_grpc.ClipSearchServiceStub, method: str, request: Any) -> Any:
    """Call a method that has to succeed (setup, state reads, restores)."""
    code, reply = rpc(stub, method, request)
    assert code is Code.OK, f"{method} answered {code.name}"
    return reply


def check_alive(server: ServerProcess, stub: pb_grpc.ClipSearchServiceStub) -> None:
    if server.proc is None or server.proc.poll() is not None:
        raise bug("server_died", f"the server exited:\n{server.log()[-5000:]}")
    try:
        stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    except grpc.RpcError as exc:
        raise bug("server_unresponsive", f"GetServerInfo failed: {exc.code()}") from None


Snapshot = dict[str, pb.StoredItem]


class Baseline(dict[str, pb.StoredItem]):
    """The fuzz target's items as first stored (a short repr for hypothesis' reports)."""

    def __repr__(self) -> str:
        return f"<{len(self)} items of {TARGET!r}>"


def snapshot(stub: pb_grpc.ClipSearchServiceStub, name: str) -> Snapshot | None:
    """Every item of a collection with its vector and metadata; None when there is none such."""
    items: Snapshot = {}
    token = ""
    while True:
        code, reply = rpc(stub, "ListItems", pb.ListItemsRequest(
            collection=name, page_size=1000, page_token=token, include_vectors=True))
        if code in (Code.NOT_FOUND, Code.INVALID_ARGUMENT) and not items:
            return None
        assert code is Code.OK, f"ListItems of {name!r} answered {code.name}"
        items.update((item.id, item) for item in reply.items)
        token = reply.next_page_token
        if not token:
            break
    count = must(stub, "CountItems", pb.CountItemsRequest(collection=name)).count
    assert count == len(items), f"CountItems says {count}, ListItems lists {len(items)}"
    return items


def collection_names(stub: pb_grpc.ClipSearchServiceStub) -> set[str]:
    reply = must(stub, "ListCollections", pb.ListCollectionsRequest())
    return {c.name for c in reply.collections}


@dataclass
class State:
    """What a write could change: the set of collections and the items of some of them."""

    names: set[str]
    items: dict[str, Snapshot | None]


def state(stub: pb_grpc.ClipSearchServiceStub, *names: str) -> State:
    return State(collection_names(stub), {n: snapshot(stub, n) for n in {TARGET, *names}})


def assert_unchanged(before: State, after: State, what: str) -> None:
    if before.names != after.names:
        raise bug("rejected_write_changed_collections",
                  f"{what} changed the collections: {sorted(before.names ^ after.names)}")
    for name, items in before.items.items():
        if after.items[name] != items:
            raise bug("rejected_write_changed_items", f"{what} changed the items of {name!r}")


def vector_of(item: pb.StoredItem) -> np.ndarray:
    return np.frombuffer(item.vector.data, dtype="<f4")


def baseline_items() -> list[pb.Item]:
    """The items of the fuzz target: varied metadata for the filters to bite on."""
    rng = np.random.default_rng(0)
    items = []
    for i, id_ in enumerate(BASE_IDS):
        item = pb.Item(id=id_, vector=pb.Vector(
            data=rng.normal(size=DIM).astype("<f4").tobytes(), dim=DIM))
        item.metadata.update({
            "n": i, "tag": ["red", "blue"] if i % 3 == 0 else ["red", "green", "blue"][i % 3],
            "exif": {"camera": f"cam{i % 4}", "iso": 100 * (i + 1)},
            "t": f"2021-06-{i % 28 + 1:02d}T12:00:00Z" if i % 2 else 1.6e9 + i * 86400.0,
            "flag": i % 2 == 0, "none": None, 'q"k': "v", "": "empty key"})
        items.append(item)
    return items


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.ClipSearchServiceStub]:
    options = [("grpc.max_send_message_length", MAX_MESSAGE),
               ("grpc.max_receive_message_length", MAX_MESSAGE)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        yield pb_grpc.ClipSearchServiceStub(channel)


@pytest.fixture(scope="module")
def baseline(stub: pb_grpc.ClipSearchServiceStub) -> Baseline:
    """Create and fill the fuzz collections; the target's items as stored."""
    assert must(stub, "GetServerInfo", pb.GetServerInfoRequest()).dim == DIM
    must(stub, "CreateCollection", pb.CreateCollectionRequest(name=EMPTY))
    reply = must(stub, "UpsertItems", pb.UpsertItemsRequest(collection=TARGET,
                                                           items=baseline_items()))
    assert reply.upserted == len(BASE_IDS) and not reply.errors
    items = snapshot(stub, TARGET)
    assert items is not None and set(items) == set(BASE_IDS)
    return Baseline(items)


def restore(stub: pb_grpc.ClipSearchServiceStub, baseline: Snapshot) -> None:
    """Put everything back as the baseline had it: after accepted writes, and after failures."""
    for name in collection_names(stub) - BASELINE_NAMES:
        must(stub, "DropCollection", pb.DropCollectionRequest(name=name))
    for name, want in ((EMPTY, {}), (TARGET, baseline)):
        have = snapshot(stub, name)
        if have is None:
            must(stub, "CreateCollection", pb.CreateCollectionRequest(name=name))
            have = {}
        extra = [id_ for id_ in have if id_ not in want]
        if extra:
            must(stub, "DeleteItems", pb.DeleteItemsRequest(collection=name, ids=extra))
        changed = [item for id_, item in want.items()
                   if id_ not in have or have[id_].metadata != item.metadata
                   or not np.allclose(vector_of(have[id_]), vector_of(item), atol=1e-6)]
        if changed:
            must(stub, "UpsertItems", pb.UpsertItemsRequest(collection=name, items=[
                pb.Item(id=s.id, vector=s.vector, metadata=s.metadata) for s in changed]))


def set_query(request: pb.SearchRequest, query: tuple[str, Any] | None) -> None:
    if query is None:
        return
    kind, arg = query
    if kind == "image":
        request.image = image_bytes(arg)
    elif kind == "vector":
        request.vector.CopyFrom(arg.message())
    else:
        setattr(request, kind, arg)


def check_item_errors(errors: Any, n: int, method: str) -> set[int]:
    """Per-item errors name distinct items of the batch and documented codes."""
    indexes = [e.index for e in errors]
    assert indexes == sorted(set(indexes)), f"{method} item errors {indexes}"
    assert all(i < n for i in indexes), f"{method} item errors {indexes} of {n} items"
    for e in errors:
        if e.code not in ITEM_CODES:
            raise bug(f"{method}_item_code_{e.code}",
                      f"{method} item {e.index} failed with code {e.code}: {e.message}")
    return set(indexes)


# --- the properties -----------------------------------------------------------------------------
def unit_vector(seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return values / np.linalg.norm(values)


class WriteSequences(RuleBasedStateMachine):
    """Random sequences of upserts (new ids and replacements) and deletes on a fresh collection,
    checked against a model after every step: search and count see exactly the model."""

    stub: pb_grpc.ClipSearchServiceStub
    runs = 0
    POOL = ("a", "b", "c")

    def __init__(self) -> None:
        super().__init__()
        WriteSequences.runs += 1
        self.name = f"fuzz-seq-{WriteSequences.runs}"
        self.model: dict[str, int] = {}  # id -> seed of its vector
        self.seeds: list[int] = []  # every vector written, the newest last
        must(self.stub, "CreateCollection", pb.CreateCollectionRequest(name=self.name))

    @rule(writes=st.lists(st.tuples(st.sampled_from(POOL), st.integers(0, 1000)),
                          min_size=1, max_size=4))
    def upsert(self, writes: list[tuple[str, int]]) -> None:
        items = [pb.Item(id=id_, vector=pb.Vector(data=unit_vector(seed).tobytes(), dim=DIM))
                 for id_, seed in writes]
        reply = must(self.stub, "UpsertItems",
                     pb.UpsertItemsRequest(collection=self.name, items=items))
        assert reply.upserted == len(items) and not reply.errors
        self.model.update(writes)
        self.seeds.extend(seed for _, seed in writes)

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(0, len(POOL) - 1), seed=st.integers(0, 1000))
    def replace(self, pick: int, seed: int) -> None:
        self.upsert([(sorted(self.model)[pick % len(self.model)], seed)])

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(0, len(POOL) - 1))
    def remove(self, pick: int) -> None:
        self.delete([sorted(self.model)[pick % len(self.model)]])

    @rule(ids=st.lists(st.sampled_from(POOL), min_size=1, max_size=3))
    def delete(self, ids: list[str]) -> None:
        reply = must(self.stub, "DeleteItems", pb.DeleteItemsRequest(collection=self.name, ids=ids))
        assert reply.deleted == len(set(ids) & set(self.model))
        for id_ in ids:
            self.model.pop(id_, None)

    @invariant()
    def search_sees_exactly_the_stored_items(self) -> None:
        # Query with old vectors too: a replaced or deleted vector left in the graph wins there.
        for seed in dict.fromkeys([*self.seeds[-6:], 10_000]):
            query = unit_vector(seed)
            reply = must(self.stub, "Search", pb.SearchRequest(
                collection=self.name, k=MAX_K, vector=pb.Vector(data=query.tobytes(), dim=DIM)))
            hits = sorted((h.id, round(h.score, 4)) for h in reply.hits)
            want = sorted((id_, round(float(unit_vector(s) @ query), 4))
                          for id_, s in self.model.items())
            if [i for i, _ in hits] != [i for i, _ in want] or not np.allclose(
                    [s for _, s in hits], [s for _, s in want], atol=1e-3):
                raise bug("search_disagrees_with_store",
                          f"query by the vector of seed {seed}: hits {hits}, stored {want}")
        count = must(self.stub, "CountItems", pb.CountItemsRequest(collection=self.name)).count
        assert count == len(self.model)

    def teardown(self) -> None:
        must(self.stub, "DropCollection", pb.DropCollectionRequest(name=self.name))


def test_index_agrees_with_the_store_over_write_sequences(
        server: ServerProcess, stub: pb_grpc.ClipSearchServiceStub) -> None:
    """Upserts that replace ids, and deletes, in any order keep search in step with the store."""
    WriteSequences.stub = stub
    run_state_machine_as_test(WriteSequences, settings=settings(
        FUZZ, max_examples=20, stateful_step_count=8))
    check_alive(server, stub)


@settings(FUZZ, max_examples=200)
@given(name=collection_args, query=queries, k=u32 | st.integers(1, 30), ef=u32,
       include_vectors=st.booleans(), filter_=filters)
def test_search_answers_only_documented_codes(
        server: ServerProcess, stub: pb_grpc.ClipSearchServiceStub, baseline: Baseline,
        name: str, query: tuple[str, Any] | None, k: int, ef: int, include_vectors: bool,
        filter_: pb.Filter | None) -> None:
    """Search: any query, k, ef and filter gets a documented answer; hits are well formed."""
    request = pb.SearchRequest(collection=name, k=k, ef=ef, include_vectors=include_vectors)
    set_query(request, query)
    if filter_ is not None:
        request.filter.CopyFrom(filter_)
    code, reply = rpc(stub, "Search", request)
    if code is Code.OK:
        hits = list(reply.hits)
        assert len(hits) <= min(k, MAX_K)
        assert len({h.id for h in hits}) == len(hits), "a hit is repeated"
        scores = [h.score for h in hits]
        assert all(math.isfinite(s) and -1.001 <= s <= 1.001 for s in scores), scores
        assert all(a >= b - 1e-5 for a, b in itertools.pairwise(scores)), scores
        for h in hits:
            if include_vectors:
                assert h.vector.dim == DIM and len(h.vector.data) == 4 * DIM
            else:
                assert not h.HasField("vector")
        if name == TARGET:
            assert {h.id for h in hits} <= set(baseline)
    check_alive(server, stub)


ItemSpec = tuple[str, tuple[str, Any] | None, dict | None]
contents = st.one_of(
    st.none(),
    st.tuples(st.just("vector"), vectors), st.tuples(st.just("vector"), vectors),
    st.tuples(st.just("text"), texts),
    st.tuples(st.just("image"), images),
)
item_specs = st.tuples(item_ids, contents, metadata_values)


def build_item(request: pb.UpsertItemsRequest, spec: ItemSpec) -> None:
    id_, content, metadata = spec
    item = request.items.add(id=id_)  # built in place: deep metadata cannot be copied
    if content is not None:
        kind, arg = content
        if kind == "vector":
            item.vector.CopyFrom(arg.message())
        elif kind == "image":
            item.image = image_bytes(arg)
        else:
            item.text = arg
    if metadata is not None:
        item.metadata.update(metadata)


@settings(FUZZ, max_examples=120)
@given(name=collection_args, specs=st.lists(item_specs, max_size=20))
def test_upsert_writes_exactly_the_accepted_items(
        server: ServerProcess, stub: pb_grpc.ClipSearchServiceStub, baseline: Baseline,
        name: str, specs: list[ItemSpec]) -> None:
    """UpsertItems: a refused call changes nothing; an accepted one writes exactly the items
    without errors, the last of each id winning, and leaves every other item as it was."""
    request = pb.UpsertItemsRequest(collection=name)
    for spec in specs:
        build_item(request, spec)
    before = state(stub, name)
    try:
        code, reply = rpc(stub, "UpsertItems", request)
        after = state(stub, name)
        if code is not Code.OK:
            assert_unchanged(before, after, f"UpsertItems answering {code.name}")
        else:
            failed = check_item_errors(reply.errors, len(specs), "UpsertItems")
            accepted = [i for i in range(len(specs)) if i not in failed]
            assert reply.upserted == len(accepted), (reply.upserted, len(accepted))
            last = {request.items[i].id: i for i in accepted}
            old = before.items[name] or {}
            new = after.items[name]
            if not accepted:  # nothing written: nothing may change, not even a new collection
                assert_unchanged(before, after, "UpsertItems writing no item")
                return
            assert new is not None, "an accepted upsert left no collection"
            assert set(new) == set(old) | set(last), "ids written are not the accepted ones"
            for id_, item in new.items():
                if id_ not in last:
                    if item != old[id_]:
                        raise bug("rejected_item_changed_stored_item",
                                  f"item {id_!r} changed though no accepted item had its id")
                    continue
                sent = request.items[last[id_]]
                assert item.metadata == sent.metadata, f"metadata of {id_!r} changed on the way"
                stored = vector_of(item)
                assert np.linalg.norm(stored) == pytest.approx(1.0, abs=1e-4)
                if sent.WhichOneof("content") == "vector":
                    values = np.frombuffer(sent.vector.data, dtype="<f4")
                    np.testing.assert_allclose(stored, values / np.linalg.norm(values),
                                               atol=1e-5)
            others = {n: s for n, s in before.items.items() if n != name}
            assert all(after.items[n] == s for n, s in others.items()), "another collection"
            assert after.names - before.names <= {name}, "other collections appeared"
    finally:
        restore(stub, baseline)
    check_alive(server, stub)


@settings(FUZZ, max_examples=120)
@given(filter_=filters, page_size=st.integers(1, 7))
def test_filters_agree_across_count_list_and_search(
        server: ServerProcess, stub: pb_grpc.ClipSearchServiceStub, baseline: Baseline,
        filter_: pb.Filter | None, page_size: int) -> None:
    """A filter gets the same answer from CountItems, ListItems and Search: the same refusal,
    or the same matching items."""
    count_req = pb.CountItemsRequest(collection=TARGET)
    list_req = pb.ListItemsRequest(collection=TARGET, page_size=page_size)
    search_req = pb.SearchRequest(collection=TARGET, k=MAX_K,
                                  vector=baseline[BASE_IDS[0]].vector)
    if filter_ is not None:
        for req in (count_req, list_req, search_req):
            req.filter.CopyFrom(filter_)
    count_code, counted = rpc(stub, "CountItems", count_req)
    listed: list[str] = []
    while True:
        list_code, page = rpc(stub, "ListItems", list_req)
        if list_code is not Code.OK:
            break
        assert len(page.items) <= page_size
        listed.extend(item.id for item in page.items)
        if not page.next_page_token:
            break
        list_req.page_token = page.next_page_token
    search_code, found = rpc(stub, "Search", search_req)
    assert count_code == list_code == search_code, (count_code, list_code, search_code)
    if count_code is Code.OK:
        assert listed == sorted(set(listed)), "ListItems pages out of order or repeated"
        assert set(listed) <= set(baseline)
        assert counted.count == len(listed)
        assert {h.id for h in found.hits} == set(listed)
    check_alive(server, stub)


# Keys of the target's metadata holding scalars or lists (json_each also walks objects' members,
# which the API does not promise), plus a few that are absent or hold an object.
ORACLE_KEYS = ["n", "tag", "t", "flag", "none", 'q"k', "exif.camera", "exif.iso", "exif",
               "missing", "exif.missing", "n.deeper"]
ORACLE_VALUES = ["red", "green", "blue", "cam0", "cam3", "v", "2021-06-02T12:00:00Z", 0, 3, 7.0,
                 19, 300, 1.6e9, True, False, None]


def _lookup(metadata: dict, key: str) -> tuple[bool, Any]:
    value: Any = metadata
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _scalar_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)


def oracle(metadata: dict, key: str, condition: tuple[str, Any]) -> bool:
    """Whether a FieldFilter with `condition` on `key` matches, as the API documents it."""
    present, value = _lookup(metadata, key)
    kind, arg = condition
    if kind == "exists":
        return present == arg
    candidates = value if isinstance(value, list) else [value]
    return present and any(_scalar_equal(c, arg) for c in candidates)


@settings(FUZZ, max_examples=60)
@given(key=st.sampled_from(ORACLE_KEYS),
       condition=st.tuples(st.just("exists"), st.booleans())
       | st.tuples(st.just("equals"), st.sampled_from(ORACLE_VALUES)))
def test_filters_select_what_they_say(
        server: ServerProcess, stub: pb_grpc.ClipSearchServiceStub, baseline: Baseline,
        key: str, condition: tuple[str, Any]) -> None:
    """exists and equals select exactly the items a plain reading of the metadata selects."""
    f = pb.Filter()
    f.field.key = key
    kind, arg = condition
    if kind == "exists":
        f.field.exists = arg
    elif arg is None:
        f.field.equals.null_value = struct_pb2.NULL_VALUE
    else:
        f.field.equals.CopyFrom(_value(
            "bool" if isinstance(arg, bool) else "string" if isinstance(arg, str) else "number",
            arg))
    want = sorted(id_ for id_, item in baseline.items()
                  if oracle(json_format.MessageToDict(item.metadata), key, condition))
    if '"' in key or not key.isprintable():  # keys a JSON path cannot express are refused
        for method, request in (
                ("ListItems", pb.ListItemsRequest(collection=TARGET, filter=f)),
                ("CountItems", pb.CountItemsRequest(collection=TARGET, filter=f))):
            code, _ = rpc(stub, method, request)
            assert code is Code.INVALID_ARGUMENT, f"{method} answered {code.name} for {key!r}"
        return
    listed = must(stub, "ListItems", pb.ListItemsRequest(collection=TARGET, page_size=1000,
                                                          filter=f))
    counted = must(stub, "CountItems", pb.CountItemsRequest(collection=TARGET, filter=f))
    got = [item.id for item in listed.items]
    if got != want or counted.count != len(want):
        raise bug("filter_selects_wrong_items",
                  f"{key!r} {kind} {arg!r}: server selected {got} (count {counted.count}), "
                  f"the metadata says {want}")
    check_alive(server, stub)


@settings(FUZZ, max_examples=80)
@given(text_list=st.lists(texts, max_size=6) | st.builds(lambda n: ["a"] * n,
                                                          st.sampled_from([4096, 4097])),
       image_list=st.lists(images, max_size=6))
def test_embed_answers_well_formed_matrices(
        server: ServerProcess, stub: pb_grpc.ClipSearchServiceStub, baseline: Baseline,
        text_list: list[str], image_list: list[Img | bytes]) -> None:
    """EmbedTexts and EmbedImages: one unit row per good item, a zero row and an error per bad
    one, or a documented refusal of the whole batch."""
    calls = (("EmbedTexts", pb.EmbedTextsRequest(texts=text_list), len(text_list)),
             ("EmbedImages", pb.EmbedImagesRequest(images=[image_bytes(i) for i in image_list]),
              len(image_list)))
    for method, request, n in calls:
        code, reply = rpc(stub, method, request)
        if code is not Code.OK:
            continue
        failed = check_item_errors(reply.errors, n, method)
        m = reply.vectors
        assert (m.rows, m.dim, len(m.data)) == (n, DIM, 4 * n * DIM), (m.rows, m.dim)
        rows = np.frombuffer(m.data, dtype="<f4").reshape(n, DIM)
        for i in range(n):
            if i in failed:
                assert not rows[i].any(), f"{method} row {i} failed but is not zero"
            else:
                assert np.linalg.norm(rows[i]) == pytest.approx(1.0, abs=1e-3), (method, i)
    check_alive(server, stub)


page_tokens = st.one_of(
    st.just(""),
    st.text(max_size=30),
    st.builds(lambda b: base64.urlsafe_b64encode(b).decode(), st.binary(max_size=30)),
    st.builds(lambda s: base64.urlsafe_b64encode(s.encode()).decode(), item_ids),
)
misc_requests = st.one_of(
    st.builds(pb.GetItemsRequest, collection=collection_args, include_vectors=st.booleans(),
              ids=st.lists(item_ids, max_size=8)
              | st.builds(lambda n: [BASE_IDS[0]] * n, st.sampled_from([4096, 4097]))),
    st.builds(pb.DeleteItemsRequest, collection=collection_args,
              ids=st.lists(item_ids, max_size=8)),
    st.builds(pb.ListItemsRequest, collection=collection_args, page_size=u32,
              page_token=page_tokens, include_vectors=st.booleans()),
    st.builds(pb.CountItemsRequest, collection=collection_args),
    st.builds(pb.GetCollectionRequest, name=collection_args),
    st.builds(pb.CreateCollectionRequest, name=collection_args,
              hnsw=st.none() | st.builds(pb.HnswConfig, m=u32, ef_construction=u32)),
    st.builds(pb.DropCollectionRequest,
              name=collection_args.filter(lambda n: n not in BASELINE_NAMES)),
    st.just(pb.ListCollectionsRequest()),
    st.just(pb.GetServerInfoRequest()),
)


@settings(FUZZ, max_examples=150)
@given(request=misc_requests)
def test_item_and_collection_calls(
        server: ServerProcess, stub: pb_grpc.ClipSearchServiceStub, baseline: Baseline,
        request: Any) -> None:
    """Get/Delete/List/Count items and Create/Get/Drop/List collections: documented answers;
    reads change nothing, a refused write changes nothing, an accepted one just what it says."""
    method = type(request).__name__.removesuffix("Request")
    name = getattr(request, "collection", "") or getattr(request, "name", "")
    before = state(stub, name)
    try:
        code, reply = rpc(stub, method, request)
        after = state(stub, name)
        items = before.items[name]
        if code is not Code.OK:
            assert_unchanged(before, after, f"{method} answering {code.name}")
        elif method == "DeleteItems":
            assert items is not None
            gone = set(request.ids) & set(items)
            assert reply.deleted == len(gone), (reply.deleted, len(gone))
            assert after.items[name] == {i: s for i, s in items.items() if i not in gone}
            assert after.names == before.names
        elif method == "CreateCollection":
            assert after.names == before.names | {name} and name not in before.names
            info = reply.collection
            assert (info.name, info.count, info.dim) == (name, 0, DIM)
            assert info.hnsw.m == (request.hnsw.m or 16)
            assert info.hnsw.ef_construction == (request.hnsw.ef_construction or 200)
        else:
            assert_unchanged(before, after, f"{method} (a read, or a drop of nothing)")
            if method == "DropCollection":
                assert not reply.dropped
            elif method == "GetItems":
                assert items is not None
                asked = list(dict.fromkeys(request.ids))  # a repeated id is answered once
                assert [i.id for i in reply.items] == [i for i in asked if i in items]
                assert list(reply.missing_ids) == [i for i in asked if i not in items]
            elif method == "ListItems":
                assert items is not None
                ids = [i.id for i in reply.items]
                assert ids == sorted(set(ids)) and set(ids) <= set(items)
                assert len(ids) <= (request.page_size or 100)
            elif method in ("CountItems", "GetCollection"):
                assert items is not None
                count = reply.count if method == "CountItems" else reply.collection.count
                assert count == len(items)
    finally:
        restore(stub, baseline)
    check_alive(server, stub)
