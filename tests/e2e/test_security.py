"""Bearer tokens, TLS and mutual TLS, metrics and request ids, against real server processes."""

from __future__ import annotations

import datetime as dt
import ipaddress
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from clipsearch import Client, ClipSearchError
from conftest import ServerProcess, free_port

TOKEN = "s3cret-token-for-tests-0123456789"


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(subject: str, issuer_key, issuer_name, *, ca: bool = False, server: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name or _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(folder: Path, name: str, key, cert) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _issue("clipsearch test CA", None, None, ca=True)
    ca_path, _ = _write(folder, "ca", ca_key, ca_cert)
    server = _write(folder, "server", *_issue("localhost", ca_key, ca_cert.subject, server=True))
    client = _write(folder, "client", *_issue("a client", ca_key, ca_cert.subject))
    rogue_ca_key, rogue_ca = _issue("rogue CA", None, None, ca=True)
    rogue = _write(folder, "rogue", *_issue("a rogue", rogue_ca_key, rogue_ca.subject))
    return Pki(ca_path, *server, *client, *rogue)


@pytest.fixture(scope="module")
def token_server(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    proc = ServerProcess(tiny_checkpoint, tmp_path_factory.mktemp("auth") / "data",
                         "--metrics-port", str(free_port()),
                         env={"CLIPSEARCH_AUTH_TOKENS": TOKEN}).start()
    yield proc
    assert proc.stop() == 0, proc.log()


def test_calls_without_a_valid_token_are_unauthenticated(token_server: ServerProcess) -> None:
    for token in (None, "wrong-token-of-enough-length-000", TOKEN + "x"):
        with Client(token_server.address, token=token) as c, pytest.raises(ClipSearchError) as e:
            c.info()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(token_server.address, token=TOKEN) as c:
        assert c.info().dim == 64
        c.upsert("secured", ids=["a"], texts=["a dog"])
        assert c.count("secured") == 1


def test_health_and_reflection_stay_open(token_server: ServerProcess) -> None:
    with grpc.insecure_channel(token_server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "clipsearch.v1.ClipSearchService" in services


def test_metrics_and_request_ids(token_server: ServerProcess) -> None:
    with Client(token_server.address, token=TOKEN) as c:
        c.upsert("metered", ids=["a", "b", "c"], texts=["one", "two", "three"])
        with pytest.raises(ClipSearchError):
            c.search("no-such", text="x")
    with grpc.insecure_channel(token_server.address) as channel:
        from clipsearch.v1 import clipsearch_pb2 as pb
        from clipsearch.v1 import clipsearch_pb2_grpc as pb_grpc

        _, call = pb_grpc.ClipSearchServiceStub(channel).CountItems.with_call(
            pb.CountItemsRequest(collection="metered"),
            metadata=(("authorization", f"Bearer {TOKEN}"), ("x-request-id", "req-42")))
        assert ("x-request-id", "req-42") in call.trailing_metadata()
    port = token_server.extra[token_server.extra.index("--metrics-port") + 1]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'clipsearch_requests_total{code="OK",method="UpsertItems"}' in text
    assert 'clipsearch_requests_total{code="NOT_FOUND",method="Search"}' in text
    assert 'clipsearch_requests_total{code="UNAUTHENTICATED",method="GetServerInfo"}' in text
    assert 'clipsearch_collection_items{collection="metered"} 3.0' in text
    assert 'clipsearch_model_batch_size_count{modality="text"}' in text
    assert "clipsearch_request_seconds_bucket" in text
    assert "clipsearch_model_load_seconds" in text


def test_mutual_tls(tiny_checkpoint, tmp_path: Path, pki: Pki) -> None:
    def creds(cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            pki.ca.read_bytes(), key.read_bytes() if key else None,
            cert.read_bytes() if cert else None)

    proc = ServerProcess(
        tiny_checkpoint, tmp_path / "data", "--tls-cert", str(pki.server_cert),
        "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca),
        credentials=creds(pki.client_cert, pki.client_key)).start()
    target = f"localhost:{proc.port}"
    try:
        with Client(target, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key,
                    timeout=10) as c:
            assert c.info().dim == 64
        for cert, key in ((None, None), (pki.rogue_cert, pki.rogue_key)):
            with Client(target, credentials=creds(cert, key), timeout=5) as c:
                with pytest.raises(ClipSearchError) as e:
                    c.info()
                assert e.value.code == grpc.StatusCode.UNAVAILABLE
        with Client(proc.address, timeout=5) as c, pytest.raises(ClipSearchError):
            c.info()  # plaintext to a TLS port
    finally:
        assert proc.stop() == 0, proc.log()
