"""HTTPS for ``serve``, with Tencent's client certificate (mutual authentication).

Tencent's ``Sign`` covers only the token and the time, not the body: a client certificate issued by
Tencent's CA (``TencentQQAuthCA.crt``) is what shows the caller is Tencent. With
``TOPIC_AUDIT_TLS_CLIENT_CA`` set, both servers refuse the handshake of any client without a certificate
from that CA.

Neither server tells the application which certificate was presented (the ASGI TLS extension), so on
uvicorn :class:`ClientCertHttpTools` adds it: the subject of the verified client certificate reaches the
callback route as ``scope["extensions"]["tls"]["client_cert_name"]`` and is recorded in the log row
(``client_cert_subject``). Granian verifies the certificate but does not expose it; its rows hold NULL.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from topic_audit.settings import PREFIX, SettingsError


def client_cert_name(transport: asyncio.BaseTransport) -> str | None:
    """The RFC 4514 subject of the client certificate the TLS handshake verified, if any."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    from cryptography import x509  # only HTTPS with client certificates needs it

    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


class ClientCertHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the ASGI TLS extension's ``client_cert_name``."""

    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        name = client_cert_name(transport)
        self._tls = {"client_cert_name": name} if name is not None else None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": self._tls}  # type: ignore[dict-item]


def check_files(cert: Path | None, key: Path | None, client_ca: Path | None) -> None:
    """One clear line naming the setting when the TLS files are incomplete, unreadable or not PEM."""
    if (cert is None) != (key is None):
        raise SettingsError(f"{PREFIX}TLS_CERT and {PREFIX}TLS_KEY must be set together")
    if client_ca is not None and cert is None:
        raise SettingsError(f"{PREFIX}TLS_CLIENT_CA needs {PREFIX}TLS_CERT and {PREFIX}TLS_KEY (HTTPS)")
    if cert is None or key is None:
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(
            f"{PREFIX}TLS_CERT/{PREFIX}TLS_KEY: cannot load {cert} with {key}: {_why(exc)}"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(f"{PREFIX}TLS_CLIENT_CA: cannot load {client_ca}: {_why(exc)}") from None


def _why(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
