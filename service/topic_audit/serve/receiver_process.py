"""A receiver process of ``serve`` (``python -m topic_audit.serve.receiver_process``), started by :mod:`topic_audit.serve.supervisor`.

It serves the app (:func:`topic_audit.receiver.app.from_environment`: settings from ``TOPIC_AUDIT_WORKER_SETTINGS``,
the token from ``TOPIC_AUDIT_TOKEN``) on the listening socket it inherits (fd ``TOPIC_AUDIT_LISTEN_FD``),
and says on the pipe ``TOPIC_AUDIT_READY_FD`` when the app has started (``ready <pid> <version>``, one
line per serving process): the supervisor stops the processes this one replaces only then.

The request head is bounded here, before the app sees it (:class:`_BoundedHead`): its bytes, its header
fields and the time it takes to arrive. uvicorn itself bounds none of them with httptools.

SIGTERM drains: the process stops accepting (the socket stays open in the supervisor and in the other
receivers, so nothing queued there is lost), answers what it is answering, answers the next request of
every kept-alive connection with ``Connection: close`` instead of closing it under a client that may be
sending (idle connections close after the keep-alive timeout, as always), then commits and stops.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
from collections.abc import Callable
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from topic_audit.metrics import package_version
from topic_audit.serve.children import LISTEN_FD, READY_FD, SERVER, THREADS
from topic_audit.serve.tls import ClientCertHttpTools

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


class HeadBounds:
    """The limits of a request head, and its deadlines: one sweep a tenth of the timeout (at most every
    0.1 s, and only while a head is awaited) expires the connections past theirs, rather than a timer per
    connection (as :class:`topic_audit.receiver.app.BodyDeadlines` does for bodies)."""

    def __init__(
        self, max_bytes: int, max_fields: int, seconds: float, timed_out: Callable[[str], None]
    ) -> None:
        self.max_bytes, self.max_fields, self.seconds = max_bytes, max_fields, seconds
        self.timed_out = timed_out
        """Counts a connection closed at its deadline, by what had arrived: ``nothing`` or ``partial``."""
        self.waiting: dict[_BoundedHead, float] = {}
        self._sweeping: asyncio.TimerHandle | None = None

    def arm(self, protocol: _BoundedHead, loop: asyncio.AbstractEventLoop) -> None:
        if protocol not in self.waiting:
            self.waiting[protocol] = loop.time() + self.seconds
            if self._sweeping is None:
                self._sweeping = loop.call_later(min(self.seconds / 10, 0.1), self._sweep, loop)

    def disarm(self, protocol: _BoundedHead) -> None:
        self.waiting.pop(protocol, None)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for protocol in [p for p, deadline in self.waiting.items() if deadline <= now]:
            del self.waiting[protocol]
            protocol.head_timed_out()
        self._sweeping = (
            loop.call_later(min(self.seconds / 10, 0.1), self._sweep, loop) if self.waiting else None
        )


class _BoundedHead:
    """uvicorn's httptools protocol with a bounded request head (:attr:`bounds`, set by :func:`_uvicorn`).

    - At most ``max_bytes`` of a head are read (request line and header fields, as received); at most
      ``max_fields`` header fields are kept. A head over either limit goes to the app all the same,
      marked (``topic_audit.receiver.app.HEAD_EXTENSION``), with what was read of it: the app answers 431 and
      records it, and the connection closes.
    - The head must arrive within ``seconds`` of the connection (of its first byte, on a kept-alive
      connection; idle ones close after uvicorn's keep-alive timeout). At the deadline a connection on
      which nothing arrived closes; one with part of a request goes to the app, marked timed out: it is
      answered 408 and recorded (reason ``header_timeout``), and the connection closes.
    """

    bounds: ClassVar[HeadBounds | None] = None
    _head: int | None = 0
    """Bytes of the current request head fed to the parser; None while its body is read."""
    _fields = 0
    _begun = False
    _refused = False

    def connection_made(self: Any, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if self.bounds is not None:
            self.bounds.arm(self, self.loop)

    def connection_lost(self: Any, exc: Exception | None) -> None:
        if self.bounds is not None:
            self.bounds.disarm(self)
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self: Any, data: bytes) -> None:
        if self._refused or self.transport.is_closing():
            return
        head, bounds = self._head, self.bounds
        if head is None or bounds is None or head + len(data) <= bounds.max_bytes:
            if head is not None:
                self._head = head + len(data)  # the parser's callbacks reset it when the head ends
            super().data_received(data)  # type: ignore[misc]
            return
        room = bounds.max_bytes - head
        self._head = bounds.max_bytes
        super().data_received(data[:room])  # type: ignore[misc]
        if self._head is None or self._head == 0:  # the head ended within what fitted
            self.data_received(data[room:])
        elif not self._begun:  # line ends alone, which the parser skips: nothing to hand over
            self.transport.close()
        elif not self._refused and not self.transport.is_closing():
            self._hand_over(timed_out=False, seen=head + len(data))

    def on_message_begin(self: Any) -> None:
        super().on_message_begin()  # type: ignore[misc]
        self._begun, self._fields = True, 0
        if self.bounds is not None:
            self.bounds.arm(self, self.loop)

    def on_header(self: Any, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self.bounds is None or self._fields <= self.bounds.max_fields:
            super().on_header(name, value)  # type: ignore[misc]

    def on_headers_complete(self: Any) -> None:
        head, self._head, self._begun = self._head, None, False
        if self.bounds is not None:
            self.bounds.disarm(self)
            if self._fields > self.bounds.max_fields:
                self._mark(timed_out=False, seen=head or 0)
        super().on_headers_complete()  # type: ignore[misc]

    def on_message_complete(self: Any) -> None:
        super().on_message_complete()  # type: ignore[misc]
        self._head = 0  # what follows is the next request's head

    def head_timed_out(self: Any) -> None:
        """The deadline passed before the head was complete."""
        if self._refused or self.transport.is_closing():
            return
        assert self.bounds is not None
        if not self._begun:
            self.bounds.timed_out("nothing")
            self.transport.close()
            return
        self.bounds.timed_out("partial")
        self._hand_over(timed_out=True, seen=self._head or 0)

    def _mark(self: Any, timed_out: bool, seen: int) -> None:
        extensions = self.scope.setdefault("extensions", {})
        extensions["topic_audit.head"] = {
            "timed_out": timed_out,
            "head_bytes": seen,
            "header_count": self._fields,
        }

    def _hand_over(self: Any, timed_out: bool, seen: int) -> None:
        """The app gets what arrived of the head, marked; nothing more is read from this connection."""
        self._refused, self._head = True, None
        if self.bounds is not None:
            self.bounds.disarm(self)
        if "method" not in self.scope:  # the method is parsed once the request target begins
            self.scope["method"] = self.parser.get_method().decode("ascii") if self.url else ""
        target, _, query = self.url.partition(b"?")
        self.scope["path"] = target.decode("latin-1")
        self.scope["raw_path"] = target
        self.scope["query_string"] = query
        self._mark(timed_out, seen)
        previous = self.cycle
        self.cycle = RequestResponseCycle(
            scope=self.scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=False,
            on_response=self.on_response_complete,
        )
        self.cycle.more_body = False
        self.cycle.message_event.set()
        if previous is None or previous.response_complete:
            self._start_asgi_task(self.cycle, self.app)
        else:  # answer the request before it first
            self.pipeline.appendleft((self.cycle, self.app))


class DrainingHttpTools(_Draining, _BoundedHead, HttpToolsProtocol):
    pass


class DrainingClientCertHttpTools(_Draining, _BoundedHead, ClientCertHttpTools):
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
    from topic_audit.receiver.app import from_environment

    _die_with_parent()
    stream = None
    if _settings().role == "receiver":  # cluster mode
        from topic_audit.cluster.publisher import StreamWriter

        stream = StreamWriter
    return Announce(from_environment(stream), int(os.environ[READY_FD]))


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
    metrics = app.app.state.metrics  # the app's own (Announce wraps it)
    protocol.bounds = HeadBounds(
        settings.max_header_bytes,
        settings.max_headers,
        settings.header_timeout_seconds,
        lambda received: metrics.header_timeouts.labels(received).inc(),
    )
    config = uvicorn.Config(
        app,
        access_log=False,
        log_level=os.environ.get("TOPIC_AUDIT_LOG_LEVEL", "info"),
        server_header=False,
        lifespan="on",
        ws="none",  # no WebSocket route: its protocol is not even loaded
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        proxy_headers=False,  # X-Forwarded-For is trusted by the app, from TOPIC_AUDIT_TRUSTED_PROXIES only
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
        import cryptography.x509  # noqa: F401  (loaded now: not on the event loop at the first certificate)

        arguments |= {
            "ssl_ca_certs": str(settings.tls_client_ca),
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "http": "topic_audit.serve.tls:ClientCertHttpTools",
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
    from granian.http import HTTP1Settings
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
        "topic_audit.serve.receiver_process:announced_app",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        workers=workers,
        factory=True,
        websockets=False,
        log_access=False,
        workers_kill_timeout=GRACEFUL_SECONDS,
        # hyper's own bounds: a head it cannot buffer (~400 KiB) or that is late is refused or closed
        # before the app sees it (not recorded); the app refuses and records heads over our limits.
        http1_settings=HTTP1Settings(
            header_read_timeout=max(1, round(settings.header_timeout_seconds * 1000))
        ),
        log_level=LogLevels(os.environ.get("TOPIC_AUDIT_LOG_LEVEL", "info")),
        **granian_tls(settings),
    ).serve()


if __name__ == "__main__":  # pragma: no cover
    main()
