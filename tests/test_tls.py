"""TLS and mutual TLS: certificates made by the test with `cryptography`, TLS-only ports, client configuration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import lossd
from lossd_server.embedded import EmbeddedServer
from tests._security import ALICE, Pki, make_pki, settings, start_error, token_file

SPEC = lossd.SessionSpec(kind="cross_entropy", n_classes=4)
LOGITS, LABELS = torch.randn(3, 4), torch.tensor([0, 1, 2])
TLS_ENV = ("LOSSD_TLS_CA", "LOSSD_TLS_CLIENT_CERT", "LOSSD_TLS_CLIENT_KEY", "LOSSD_TLS_SERVER_NAME", "LOSSD_TOKEN")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TLS_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(settings(tls_cert=pki.server_cert, tls_key=pki.server_key)) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    config = settings(
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        token_file=token_file(tmp_path_factory.mktemp("mtls")),
    )
    with EmbeddedServer(config) as running:
        yield running


def connect(server: EmbeddedServer, **options: Any) -> lossd.Client:
    # retry_deadline=0: a refused handshake must fail at once, not be retried for a minute.
    return lossd.Client(server.target, retry_deadline=0, timeout=10, **options)


def round_trip(client: lossd.Client, name: str = "tls-run") -> None:
    client.create_session(name, SPEC)
    assert client.compute_loss(name, LOGITS, LABELS, stream=True).n_used == 3
    assert client.compute_loss(name, LOGITS, LABELS, stream=False).n_used == 3
    client.delete_session(name)


# TLS ----------------------------------------------------------------------------------


def test_a_client_trusting_the_ca_is_served_on_every_path(tls_server: EmbeddedServer, pki: Pki) -> None:
    with connect(tls_server, tls=lossd.TLSConfig(ca=pki.ca)) as client:
        round_trip(client)
    # The certificate names localhost too: a target by name, or an override of the checked name.
    port = tls_server.target.rsplit(":", 1)[1]
    with lossd.Client(f"localhost:{port}", tls=lossd.TLSConfig(ca=str(pki.ca)), retry_deadline=0) as client:
        client.list_sessions()
    with connect(tls_server, tls=lossd.TLSConfig(ca=pki.ca, server_name="localhost")) as client:
        client.list_sessions()


@pytest.mark.parametrize(
    "tls",
    [False, True, "wrong-name"],
    ids=["plaintext", "system-roots-only", "name-not-in-certificate"],
)
def test_a_client_that_cannot_verify_or_speaks_plaintext_is_refused(
    tls_server: EmbeddedServer, pki: Pki, tls: object
) -> None:
    config = lossd.TLSConfig(ca=pki.ca, server_name="other.example") if tls == "wrong-name" else tls
    with connect(tls_server, tls=config) as client, pytest.raises(lossd.UnavailableError):
        client.list_sessions()


def test_the_tls_port_serves_no_plaintext_not_even_health(tls_server: EmbeddedServer, pki: Pki) -> None:
    with grpc.insecure_channel(tls_server.target) as channel, pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    with grpc.secure_channel(tls_server.target, credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# Mutual TLS --------------------------------------------------------------------------------


def test_mtls_serves_a_client_with_a_certificate_and_a_token(mtls_server: EmbeddedServer, pki: Pki) -> None:
    tls = lossd.TLSConfig(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    with connect(mtls_server, tls=tls, token=ALICE) as client:
        round_trip(client)
    # The certificate admits the connection; the token still decides the tenant.
    with connect(mtls_server, tls=tls, token="") as client, pytest.raises(lossd.UnauthenticatedError):
        client.list_sessions()


@pytest.mark.parametrize("certificate", ["none", "rogue"])
def test_mtls_refuses_a_client_without_a_certificate_the_ca_signed(
    mtls_server: EmbeddedServer, pki: Pki, certificate: str
) -> None:
    if certificate == "none":
        tls = lossd.TLSConfig(ca=pki.ca)
    else:
        tls = lossd.TLSConfig(ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key)
    with connect(mtls_server, tls=tls, token=ALICE) as client, pytest.raises(lossd.UnavailableError):
        client.list_sessions()


def test_the_client_reads_tls_and_token_from_the_environment(
    mtls_server: EmbeddedServer, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOSSD_TLS_CA", str(pki.ca))
    monkeypatch.setenv("LOSSD_TLS_CLIENT_CERT", str(pki.client_cert))
    monkeypatch.setenv("LOSSD_TLS_CLIENT_KEY", str(pki.client_key))
    monkeypatch.setenv("LOSSD_TLS_SERVER_NAME", "localhost")
    monkeypatch.setenv("LOSSD_TOKEN", ALICE)
    with connect(mtls_server) as client:
        assert client.config.tls == lossd.TLSConfig(str(pki.ca), str(pki.client_cert), str(pki.client_key), "localhost")
        round_trip(client)
    # tls=True keeps the variables; arguments win over them.
    with connect(mtls_server, tls=True) as client:
        client.list_sessions()
    with connect(mtls_server, tls=lossd.TLSConfig(ca=pki.ca)) as client, pytest.raises(lossd.UnavailableError):
        client.list_sessions()
    with connect(mtls_server, tls=False) as client, pytest.raises(lossd.UnavailableError):
        client.list_sessions()


def test_modules_pass_tls_through(mtls_server: EmbeddedServer, pki: Pki) -> None:
    tls = lossd.TLSConfig(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    with lossd.CrossEntropyLoss(n_classes=4, target=mtls_server.target, token=ALICE, tls=tls) as criterion:
        torch.testing.assert_close(criterion(LOGITS, LABELS), torch.nn.functional.cross_entropy(LOGITS, LABELS))


def test_the_servers_variable_names_do_not_configure_the_client(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    # LOSSD_TLS_CERT, LOSSD_TLS_KEY and LOSSD_TOKEN_FILE are `lossd serve` settings, often set in the same shell.
    monkeypatch.setenv("LOSSD_TLS_CERT", str(pki.server_cert))
    monkeypatch.setenv("LOSSD_TLS_KEY", str(pki.server_key))
    monkeypatch.setenv("LOSSD_TOKEN_FILE", "/nonexistent")
    with lossd.Client("127.0.0.1:1") as client:
        assert client.config.tls is None and client.config.token is None


def test_client_tls_mistakes_fail_when_the_client_is_made(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="a client certificate needs its key"):
        lossd.TLSConfig(cert=pki.client_cert)
    with pytest.raises(OSError, match="cannot read the CA bundle"):
        lossd.Client("127.0.0.1:1", tls=lossd.TLSConfig(ca=tmp_path / "missing.pem"))


# Server start-up ------------------------------------------------------------------------------


def test_incomplete_or_unreadable_tls_settings_are_startup_errors(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    cases: list[tuple[dict[str, Path], type[Exception], str]] = [
        ({"tls_cert": pki.server_cert}, ValueError, "--tls-cert needs --tls-key"),
        ({"tls_key": pki.server_key}, ValueError, "--tls-key needs --tls-cert"),
        ({"tls_client_ca": pki.ca}, ValueError, "--tls-client-ca needs --tls-cert and --tls-key"),
        ({"tls_cert": tmp_path / "missing.pem", "tls_key": pki.server_key}, OSError, "cannot read --tls-cert"),
        ({"tls_cert": pki.server_key, "tls_key": pki.server_cert}, ValueError, "is not a PEM file with a CERTIFICATE"),
        ({"tls_cert": pki.server_cert, "tls_key": not_pem}, ValueError, "is not a PEM file with a PRIVATE KEY"),
        ({"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": not_pem}, ValueError, "client-ca"),
    ]
    for overrides, kind, expected in cases:
        error = start_error(settings(**overrides))
        assert isinstance(error, kind) and expected in str(error), (overrides, error)
