"""A receiver process of ``serve`` (``python -m topic_audit.worker``), started by :mod:`topic_audit.supervisor`.

It serves the app (:func:`topic_audit.app.from_environment`: settings from ``TOPIC_AUDIT_WORKER_SETTINGS``,
the token from ``TOPIC_AUDIT_TOKEN``) on the listening socket it inherits (fd ``TOPIC_AUDIT_LISTEN_FD``),
and says on the pipe ``TOPIC_AUDIT_READY_FD`` when the app has started (``ready <pid> <version>``, one
line per serving process): the supervisor stops the processes this one replaces only then.

SIGTERM drains: the process stops accepting (the socket stays open in the supervisor and in the other
receivers, so nothing queued there is lost), answers what it is answering, answers the next request of
every kept-alive connection with ``Connection: close`` instead of closing it under a client that may be
sending (idle connections close after the keep-alive timeout, as always), then commits and stops.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from topic_audit.metrics import package_version
from topic_audit.tls import ClientCertHttpTools

LISTEN_FD = "TOPIC_AUDIT_LISTEN_FD"
READY_FD = "TOPIC_AUDIT_READY_FD"
SERVER = "TOPIC_AUDIT_SERVER"
THREADS = "TOPIC_AUDIT_WORKERS"
GRACEFUL_SECONDS = 30
"""Longest a draining process waits for its connections before it cancels what is left."""
_PR_SET_PDEATHSIG = 1


class _Draining:
    """What uvicorn's protocol does on shutdown, without closing an idle kept-alive connection: its next
    answer carries ``Connection: close`` (a client may be writing on it right now)."""

    draining = False

    def shutdown(self: Any) -> None:
        self.draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False

    def on_headers_complete(self: Any) -> None:
        super().on_headers_complete()  # type: ignore[misc]
        if self.draining and self.cycle is not None:
            self.cycle.keep_alive = False


class DrainingHttpTools(_Draining, HttpToolsProtocol):
    pass


class DrainingClientCertHttpTools(_Draining, ClientCertHttpTools):
    pass


class Announce:
    """The app, and one line on the ready pipe once its lifespan has started (any ASGI server)."""

    def __init__(self, app: Any, fd: int) -> None:
        self.app, self.fd = app, fd

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def announcing(message: Any) -> None:
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                os.write(self.fd, f"ready {os.getpid()} {package_version()}\n".encode())

        await self.app(scope, receive, announcing)


def main() -> None:
    _die_with_parent()
    sock = socket.socket(fileno=int(os.environ[LISTEN_FD]))
    if os.environ.get(SERVER) == "granian":
        _granian(sock, int(os.environ.get(THREADS, "1")))
    else:
        _uvicorn(announced_app(), sock)


def announced_app() -> Announce:
    """The app of this process (of each of granian's workers), announcing itself once started."""
    from topic_audit.app import from_environment

    _die_with_parent()

    return Announce(from_environment(), int(os.environ[READY_FD]))


def _die_with_parent() -> None:
    """SIGTERM (a drain) when the parent ends, however it ends: no receiver outlives its supervisor."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _settings() -> Any:
    from topic_audit.settings import WORKER_SETTINGS, Settings

    return Settings.from_workers_json(os.environ[WORKER_SETTINGS], None)


def _uvicorn(app: Any, sock: socket.socket) -> None:
    import uvicorn

    settings = _settings()
    tls = uvicorn_tls(settings)
    protocol = DrainingClientCertHttpTools if "http" in tls else DrainingHttpTools
    config = uvicorn.Config(
        app,
        access_log=False,
        log_level=os.environ.get("TOPIC_AUDIT_LOG_LEVEL", "info"),
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        **{**tls, "http": protocol},
    )
    uvicorn.Server(config).run(sockets=[sock])


def uvicorn_tls(settings: Any) -> dict[str, Any]:
    """uvicorn's TLS arguments; with a client CA, the protocol that exposes the client's certificate."""
    if settings.tls_cert is None:
        return {}
    import ssl

    arguments: dict[str, Any] = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
    if settings.tls_client_ca is not None:
        arguments |= {
            "ssl_ca_certs": str(settings.tls_client_ca),
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "http": "topic_audit.tls:ClientCertHttpTools",
        }
    return arguments


def granian_tls(settings: Any) -> dict[str, Any]:
    if settings.tls_cert is None:
        return {}
    arguments: dict[str, Any] = {"ssl_cert": settings.tls_cert, "ssl_key": settings.tls_key}
    if settings.tls_client_ca is not None:
        arguments |= {"ssl_ca": settings.tls_client_ca, "ssl_client_verify": True}
    return arguments


def _granian(sock: socket.socket, workers: int) -> None:
    """Granian's own workers (``--workers`` of them) on the inherited socket, in one process group."""
    from granian._granian import SocketHolder
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server import Server

    class Inherited(Server):  # type: ignore[misc,valid-type]
        def _init_shared_socket(self) -> None:
            sock.set_inheritable(True)
            self._ssp, self._shd, self._sfd, self._sso = (
                None,
                SocketHolder(sock.fileno(), False, 2048),  # type: ignore[call-arg]
                sock.fileno(),
                sock,
            )

        def _drop_shared_socket(self) -> None:
            sock.close()

    settings = _settings()
    Inherited(
        "topic_audit.worker:announced_app",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        workers=workers,
        factory=True,
        websockets=False,
        log_access=False,
        workers_kill_timeout=GRACEFUL_SECONDS,
        log_level=LogLevels(os.environ.get("TOPIC_AUDIT_LOG_LEVEL", "info")),
        **granian_tls(settings),
    ).serve()


if __name__ == "__main__":  # pragma: no cover
    main()
