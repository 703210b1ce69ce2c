"""uvicorn's httptools protocol as ``serve`` runs it: one write per answer, and the client certificate.

uvicorn writes an answer's status line and headers when the application sends ``http.response.start``,
and its body in a second write: two ``send`` system calls per callback, each taken with the GIL held,
and each costing what the other end's TCP receive costs on loopback. :class:`OneWrite` holds the head
until the body comes (or the answer ends without one, as for ``HEAD``), so both leave in one call.

With a client CA (mutual TLS), the subject of the verified client certificate reaches the callback route
as the ASGI TLS extension's ``scope["extensions"]["tls"]["client_cert_name"]`` (neither server exposes
it; see :mod:`topic_audit.tls`), and is recorded in the log row (``client_cert_subject``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from topic_audit.tls import client_cert_name

_INTERIM = b"HTTP/1.1 1"  # 100 Continue and other interim answers leave at once


class OneWrite:
    """A connection's transport that holds an answer's head until its body, then writes both at once.

    Everything else is the transport's own. Whatever is held leaves before any later write, on
    :meth:`flush` (the answer is complete) and on :meth:`close`, so the bytes and their order are
    exactly uvicorn's.
    """

    __slots__ = ("_head", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head = b""

    def write(self, data: bytes) -> None:
        if self._head:
            data, self._head = self._head + data, b""
        elif data.startswith(b"HTTP/1.1 ") and not data.startswith(_INTERIM) and data.endswith(b"\r\n\r\n"):
            self._head = data
            return
        self._transport.write(data)

    def flush(self) -> None:
        if self._head:
            head, self._head = self._head, b""
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class ReceiverHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing each answer at once, with the ASGI TLS extension's
    ``client_cert_name`` when the client presented a verified certificate."""

    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        name = client_cert_name(transport)
        self._tls = {"client_cert_name": name} if name is not None else None
        super().connection_made(OneWrite(transport))  # type: ignore[arg-type]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": self._tls}  # type: ignore[dict-item]

    def on_response_complete(self) -> None:
        transport: OneWrite = self.transport  # type: ignore[assignment]
        transport.flush()
        super().on_response_complete()
