"""HTTPS with Tencent's client certificate, on both servers, with certificates made here: a real TLS
handshake with the client certificate gets 200 and a row; without one, or with one from another CA, the
handshake is refused and nothing reaches the log."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import APP_ID, TOKEN, Server, rows
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from topic_audit.tencent import samples

pytestmark = pytest.mark.slow  # real serve processes (make test-fast leaves them out)

Key = ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "topic-audit tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _certificate(
    subject: str, key: Key, issuer: tuple[x509.Certificate, Key] | None, **kind: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if kind.get("ca"):
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    if kind.get("server"):
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: Key) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@dataclass
class Pki:
    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    stranger: tuple[Path, Path]
    """A client certificate from another CA."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Test IM CA", ca_key, None, ca=True)
    other = _certificate("Another CA", other_key, None, ca=True)
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    ca_path, _ = _write(folder, "ca", ca, ca_key)
    return Pki(
        ca=ca_path,
        server=_write(
            folder, "server", _certificate("127.0.0.1", keys[0], (ca, ca_key), server=True), keys[0]
        ),
        client=_write(folder, "client", _certificate("tencent-im-callback", keys[1], (ca, ca_key)), keys[1]),
        stranger=_write(
            folder, "stranger", _certificate("tencent-im-callback", keys[2], (other, other_key)), keys[2]
        ),
    )


def _context(pki: Pki, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


@pytest.fixture(params=["uvicorn", "granian"])
def https_server(request: pytest.FixtureRequest, pki: Pki, tmp_path: Path) -> Iterator[Server]:
    env = {
        "TOPIC_AUDIT_SERVER": request.param,
        "TOPIC_AUDIT_TLS_CERT": str(pki.server[0]),
        "TOPIC_AUDIT_TLS_KEY": str(pki.server[1]),
        "TOPIC_AUDIT_TLS_CLIENT_CA": str(pki.ca),
    }
    running = Server(
        tmp_path / "audit.db", tmp_path / "server.log", env, {"verify": _context(pki, pki.client)}
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _deliver(server: Server, context: ssl.SSLContext) -> httpx.Response:
    body = samples.sample("after-create")
    query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
    with httpx.Client(verify=context, timeout=5) as client:
        return client.post(f"{server.url}/callback?{query}", json=body)


def test_a_client_certificate_from_the_ca_is_answered_and_recorded(https_server: Server, pki: Pki) -> None:
    assert https_server.url.startswith("https://")
    response = _deliver(https_server, _context(pki, pki.client))
    assert response.status_code == 200, response.text
    (row,) = rows(https_server.db)
    assert row["outcome"] == "accepted"
    if https_server.env["TOPIC_AUDIT_SERVER"] == "uvicorn":  # granian does not expose the certificate
        assert row["client_cert_subject"] == "CN=tencent-im-callback,O=topic-audit tests"
    else:
        assert row["client_cert_subject"] is None


@pytest.mark.parametrize("who", ["no certificate", "another CA"])
def test_other_clients_are_refused_at_the_handshake(https_server: Server, pki: Pki, who: str) -> None:
    context = _context(pki, None if who == "no certificate" else pki.stranger)
    with pytest.raises(httpx.TransportError):
        _deliver(https_server, context)
    assert rows(https_server.db) == []  # refused before any request reached the receiver
    assert _deliver(https_server, _context(pki, pki.client)).status_code == 200  # still serving


def test_plain_http_is_refused(https_server: Server) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{https_server.port}/healthz", timeout=3)
