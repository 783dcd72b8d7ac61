"""Scoped tokens: every method under every scope, collection globs, the tokens-file format."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipsearch import Client, ClipSearchError
from clipsearch.v1 import clipsearch_pb2 as pb
from clipsearch_server.doors.auth import (
    ADMIN,
    METHOD_SCOPES,
    READ,
    SCOPES,
    WRITE,
    TokenGrant,
    load_tokens,
    request_scope,
    required_scope,
)
from clipsearch_server.errors import InvalidArgument
from clipsearch_server.stores.local import STORE_FILE
from conftest import REPO, ServerProcess

SERVICE = pb.DESCRIPTOR.services_by_name["ClipSearchService"]
TOKENS = {scope: f"token-with-scope-{scope}-0123456789" for scope in SCOPES}
TEAM_TOKEN = "token-for-team-collections-only-0123"
BARE_TOKEN = "a-bare-token-means-admin-everywhere-01"


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


TINY_PNG = _png()


@pytest.fixture(scope="module")
def scoped_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("scoped")
    tokens = folder / "tokens"
    tokens.write_text("\n".join([
        "# token scope [collection globs]",
        *(f"{token} {scope}" for scope, token in TOKENS.items()),
        f"{TEAM_TOKEN} write team-* shared  # a comment after the globs",
        BARE_TOKEN,
    ]) + "\n")
    proc = ServerProcess(tiny_checkpoint, folder / "data", "--auth-tokens-file",
                         str(tokens)).start()
    yield proc
    assert proc.stop() == 0, proc.log()


def _request(method: grpc.Method, collection: str) -> object:
    cls = getattr(pb, method.input_type.name)
    fields = method.input_type.fields_by_name
    if "collection" in fields:
        return cls(collection=collection)
    if "name" in fields:
        return cls(name=collection)
    return cls()


def _call(address: str, method_name: str, token: str, collection: str,
          request: object = None) -> grpc.StatusCode:
    method = SERVICE.methods_by_name[method_name]
    output = getattr(pb, method.output_type.name)
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE.full_name}/{method_name}",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=output.FromString)
        try:
            call(request or _request(method, collection), timeout=30,
                 metadata=(("authorization", f"Bearer {token}"),))
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            assert exc.code() != grpc.StatusCode.PERMISSION_DENIED or \
                "scope" in exc.details(), exc.details()
            return exc.code()


def test_every_method_has_a_scope_in_the_one_table() -> None:
    for method in SERVICE.methods:
        assert method.name in METHOD_SCOPES, f"{method.name} has no scope in auth.METHOD_SCOPES"
    assert required_scope("/clipsearch.v1.ClipSearchService/SomethingNew") == ADMIN
    for name in ("Recommend", "Classify", "FindDuplicates", "Cluster"):
        assert METHOD_SCOPES[name] == READ
    assert METHOD_SCOPES["DropCollection"] == ADMIN
    cluster = "/clipsearch.v1.ClipSearchService/Cluster"
    assert request_scope(cluster, pb.ClusterRequest(n_clusters=2)) == READ
    assert request_scope(cluster, pb.ClusterRequest(n_clusters=2, metadata_key="k")) == WRITE


def readme_scope_table() -> dict[tuple[str, bool], str]:
    """README's method -> scope table: {(method, writes labels): scope}."""
    text = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| (`[A-Z].*?) \| (read|write|admin) \|$", text, re.MULTILINE)
    table = {}
    for names, scope in rows:
        labels = "metadata_key" in names
        for name in re.findall(r"`([A-Z][A-Za-z]+)`", names):
            table[(name, labels)] = scope
    return table


def test_readme_scope_table_matches_the_servers_table() -> None:
    table = readme_scope_table()
    assert {name for name, _ in table} == {m.name for m in SERVICE.methods}
    for (name, labels), scope in table.items():
        if not labels:
            assert METHOD_SCOPES[name] == scope, name
    assert table[("Cluster", True)] == WRITE


def _readme_cases() -> list[tuple[str, bool, str, str]]:
    return [(name, labels, needed, scope) for (name, labels), needed in
            sorted(readme_scope_table().items()) for scope in SCOPES]


@pytest.mark.parametrize(("method", "labels", "needed", "scope"), _readme_cases())
def test_every_method_under_every_scope(scoped_server: ServerProcess, method: str,
                                        labels: bool, needed: str, scope: str) -> None:
    """Walks README's table against the server: each row under each scope."""
    collection = f"scope-{scope}-{method.lower()}"  # never there: drops change nothing
    request = _request(SERVICE.methods_by_name[method], collection)
    if labels:
        request.metadata_key = "theme"
    code = _call(scoped_server.address, method, TOKENS[scope], collection, request)
    if SCOPES.index(scope) >= SCOPES.index(needed):
        assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED


def test_classify_without_a_collection_is_open_to_a_scoped_token(
        scoped_server: ServerProcess) -> None:
    with Client(scoped_server.address, token=TEAM_TOKEN) as team:
        result = team.classify([TINY_PNG], ["cat", "dog"])
    assert len(result) == 1 and {s.label for s in result[0].scores} == {"cat", "dog"}


def test_server_info_lists_only_unavailable_collections_the_token_reaches(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(tiny_checkpoint, data).start()
    with Client(server.address) as c:
        for name in ("team-broken", "private-broken"):
            c.upsert(name, ids=["a"], vectors=np.eye(1, 64, dtype=np.float32))
    assert server.stop() == 0, server.log()
    for name in ("team-broken", "private-broken"):
        store = data / "collections" / name / STORE_FILE
        store.write_bytes(b"\xff" * 16 + store.read_bytes()[16:])
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TEAM_TOKEN} read team-*\n{BARE_TOKEN}\n")
    server = ServerProcess(tiny_checkpoint, data, "--auth-tokens-file", str(tokens)).start()
    try:
        with Client(server.address, token=TEAM_TOKEN) as team:
            assert set(team.info().unavailable_collections) == {"team-broken"}
        with Client(server.address, token=BARE_TOKEN) as admin:
            assert set(admin.info().unavailable_collections) == {"team-broken",
                                                                  "private-broken"}
    finally:
        assert server.stop() == 0, server.log()


def test_refusal_names_the_scope_needed(scoped_server: ServerProcess) -> None:
    with Client(scoped_server.address, token=TOKENS[READ]) as c, \
            pytest.raises(ClipSearchError) as err:
        c.drop_collection("anything")
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "'admin'" in err.value.details and "'read'" in err.value.details


def test_globs_limit_the_collections_a_token_reaches(scoped_server: ServerProcess) -> None:
    vectors = np.eye(2, 64, dtype=np.float32)
    with Client(scoped_server.address, token=BARE_TOKEN) as admin:
        admin.upsert("private", ids=["p1", "p2"], vectors=vectors)
    with Client(scoped_server.address, token=TEAM_TOKEN) as team:
        team.upsert("team-a", ids=["a1", "a2"], vectors=vectors)
        team.upsert("shared", ids=["s1"], vectors=vectors[:1])
        assert team.count("team-a") == 2
        assert team.search("team-a", vector=vectors[0], k=1)[0].id == "a1"
        names = [info.name for info in team.collections()]
        assert "private" not in names and {"team-a", "shared"} <= set(names)
        for call in (lambda: team.count("private"),
                     lambda: team.search("private", vector=vectors[0], k=1),
                     lambda: team.upsert("private", ids=["x"], vectors=vectors[:1]),
                     lambda: team.create_collection("sharedX"),
                     lambda: team.collection("private")):
            with pytest.raises(ClipSearchError) as err:
                call()
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert "team-*" in err.value.details
        with pytest.raises(ClipSearchError) as err:
            team.drop_collection("team-a")  # write scope, even on its own collections
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    with Client(scoped_server.address, token=BARE_TOKEN) as admin:
        assert admin.count("private") == 2
        assert admin.drop_collection("team-a")


def test_health_stays_open(scoped_server: ServerProcess) -> None:
    with grpc.insecure_channel(scoped_server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tokens_file_format(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# comment\n\nplain-token-of-enough-length\n"
                    "reader-token-of-enough-length READ photos-* team\n")
    grants = load_tokens(path, "env-token-of-enough-length write, other-env-token-long-enough")
    assert grants == [
        TokenGrant("plain-token-of-enough-length", ADMIN, ()),
        TokenGrant("reader-token-of-enough-length", READ, ("photos-*", "team")),
        TokenGrant("env-token-of-enough-length", WRITE, ()),
        TokenGrant("other-env-token-long-enough", ADMIN, ()),
    ]
    assert grants[1].allows_collection("photos-2024") and not grants[1].allows_collection("x")
    for bad in ("short read", "token-of-enough-length-0 superuser"):
        path.write_text(bad + "\n")
        with pytest.raises(InvalidArgument):
            load_tokens(path, None)
