"""The receiver: ``create_app(settings)`` builds the Litestar application.

The callback route is an ASGI handler so that it sees every request to its path, whatever the method,
and reads the body itself with a hard limit on the bytes actually received. Its path is one way:
raw request -> :func:`topic_audit.tencent.checks.decide` -> one durable append by the writer -> the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hashlib
import importlib
import ipaddress
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import msgspec
from litestar import Litestar, MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.handlers import asgi
from litestar.plugins.prometheus import PrometheusConfig
from litestar.types import HTTPResponseBodyEvent, HTTPResponseStartEvent, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from topic_audit import clock
from topic_audit.forwarding import outbox
from topic_audit.log import chain
from topic_audit.metrics import Metrics
from topic_audit.settings import WORKER_SETTINGS, Settings, configure_logging
from topic_audit.tencent import checks, models
from topic_audit.writer import jobs
from topic_audit.writer.client import WRITER_SOCKET, RemoteWriter
from topic_audit.writer.requests import AppendError, Forward

if TYPE_CHECKING:  # loaded only when forwarding, without serve, or after start: a receiver answers sooner
    from topic_audit.forwarding.forwarder import Delivery, Forwarder
    from topic_audit.writer.thread import AuditWriter, Writer

    class Stream(Writer, Protocol):
        """Cluster mode: the intake a receiver publishes to, in place of a writer
        (:class:`topic_audit.cluster.publisher.StreamWriter`)."""

        async def open(self) -> None: ...


log = logging.getLogger("topic_audit")

REDACTED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})
SECRET_HEADER = re.compile(
    r"auth|token|secret|passw|pwd|credential|key|session|cookie|signature|sign$|csrf|xsrf|jwt|bearer"
)
"""Header names that look like they carry a credential: their values are stored as ``[redacted]`` (on
top of :data:`REDACTED_HEADERS`). Over-matching costs a header's value in the log; under-matching
stores a secret."""
HEAD_EXTENSION = "topic_audit.head"
"""``scope["extensions"]`` key by which the server hands over a request whose head it stopped reading
(too large, or not in time): ``{"timed_out": bool, "head_bytes": int, "header_count": int}``
(:mod:`topic_audit.serve.receiver_process`). The request is recorded like any other, whatever its path."""
TRUNCATED_KEY = "[truncated]"
"""Key of the ``request_headers`` JSON that says what of the headers was not kept (never a header name:
brackets are not allowed in one)."""
_JSON_HEADERS = [(b"content-type", b"application/json")]
MAX_ELAPSED_MS = 1e8  # keeps the float inside the range where the canonical form is unambiguous
_FIELD_LIMIT = 256  # query-derived columns are bounded; the full query string is kept in query_string


def _headers(scope: Scope) -> tuple[tuple[str, str], ...]:
    return tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"])


@functools.lru_cache(maxsize=1024)
def redacted(name: str) -> bool:
    """Whether the value of header ``name`` (lowercase) is a credential, never stored."""
    return name in REDACTED_HEADERS or SECRET_HEADER.search(name) is not None


def headers_json(headers: tuple[tuple[str, str], ...], truncated: str | None = None) -> str:
    """Request headers as a JSON object; repeated names joined with ", "; credentials redacted; with
    ``truncated``, the key :data:`TRUNCATED_KEY` says what was not kept."""
    merged: dict[str, str] = {}
    for name, value in headers:
        shown = "[redacted]" if redacted(name) else value
        merged[name] = f"{merged[name]}, {shown}" if name in merged else shown
    if truncated is not None:
        merged[TRUNCATED_KEY] = truncated
    return msgspec.json.encode(merged).decode()


def head_size(scope: Any) -> int:
    """Bytes of the request head as sent: request line and header fields, with their line ends."""
    query = scope["query_string"]
    line = len(scope["method"]) + len(scope.get("raw_path") or scope["path"]) + 13  # spaces, version, CRLF
    fields = sum(len(name) + len(value) for name, value in scope["headers"]) + 4 * len(scope["headers"])
    return line + (len(query) + 1 if query else 0) + fields + 2


def bounded_headers(
    headers: tuple[tuple[str, str], ...], max_bytes: int, max_fields: int
) -> tuple[tuple[str, str], ...]:
    """The first header fields that fit ``max_bytes`` and ``max_fields`` (the one that crosses the byte
    limit cut short)."""
    kept: list[tuple[str, str]] = []
    room = max_bytes
    for name, value in headers[:max_fields]:
        room -= len(name) + 4
        if room <= 0:
            break
        kept.append((name, value[:room]))
        room -= len(value)
        if room <= 0:
            break
    return tuple(kept)


def _truncation(request: checks.RawRequest) -> str | None:
    """What :data:`TRUNCATED_KEY` says of a request whose headers were not all kept."""
    if not request.headers_truncated:
        return None
    kept = sum(len(n) + len(v) + 4 for n, v in request.headers)
    return (
        f"truncated: kept {len(request.headers)} of {request.header_count} header fields ({kept} bytes) "
        f"of a request head of {request.head_bytes} bytes as received"
    )


async def read_body(receive: Receive, declared: int | None, limit: int) -> tuple[bytes, bool]:
    """The body, read up to ``limit`` bytes; (bytes, truncated). Nothing is read past the limit."""
    if declared is not None and declared > limit:
        return b"", True
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            break
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                chunks.append(chunk[: limit - (size - len(chunk))])
                return b"".join(chunks), True
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks), False


def _declared_length(headers: tuple[tuple[str, str], ...]) -> int | None:
    for name, value in headers:
        if name == "content-length":
            return int(value) if value.isdigit() else None
    return None


def _client_cert(scope: Scope) -> str | None:
    """``client_cert_name`` of the ASGI TLS extension (see :mod:`topic_audit.serve.tls`), bounded."""
    extensions = scope.get("extensions")
    tls = extensions.get("tls") if extensions else None
    name = tls.get("client_cert_name") if tls else None
    return name[:1024] if isinstance(name, str) else None


def _bounded(value: str | None) -> str | None:
    return value[:_FIELD_LIMIT] if value is not None else None


def build_row(
    request: checks.RawRequest, decision: checks.Decision, received: float, elapsed: float, answer: bytes
) -> dict[str, Any]:
    """The log row for ``decision`` (all columns but ``id`` and the chain links)."""
    query = decision.query
    return {
        "received_at": clock.iso(received),
        "method": request.method,
        "path": request.path,
        "query_string": request.query_string,
        "sdk_app_id": _bounded(query.get("SdkAppid")),
        "callback_command": _bounded(decision.command),
        "client_ip": _bounded(query.get("ClientIP")),
        "opt_platform": _bounded(query.get("OptPlatform")),
        "request_time": _bounded(query.get("RequestTime")),
        "remote_addr": request.remote_addr,
        "request_headers": headers_json(request.headers, _truncation(request)),
        "request_body": chain.stored_body(request.body),
        "request_body_sha256": hashlib.sha256(request.body).hexdigest(),
        "request_body_bytes": len(request.body),
        "status_code": decision.status_code,
        "response_body": answer.decode(),
        "outcome": decision.outcome,
        "reason": decision.reason,
        "detail": decision.detail[:2000] if decision.detail else None,
        "topic_id": decision.topic_id,
        "group_id": decision.group_id,
        "duplicate_of": None,
        "elapsed_ms": round(min(max(elapsed * 1000, 0.0), MAX_ELAPSED_MS), 3),
        "client_cert_subject": request.client_cert,
    }


class Receiver(Litestar):
    """Litestar, with the callback path served before its router.

    Every callback goes straight to its ASGI handler: Litestar's routing, middleware stack and scope
    wrapping cost about as much per request as the whole bare framework endpoint (the profile in
    docs/performance.md, "Where the time went"). Every other route (health, readiness, metrics) is Litestar's as usual; the callback
    handler is registered as a route too, so that paths Litestar would normalise still reach it.
    """

    callback_path: str
    callback: Callable[[Scope, Receive, Send], Awaitable[None]]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (
            scope["path"] == self.callback_path or HEAD_EXTENSION in (scope.get("extensions") or ())
        ):
            scope["app"] = scope["litestar_app"] = self
            try:
                await self.callback(scope, receive, send)
            except Exception:  # what Litestar's exception middleware would have done
                log.exception("unhandled exception on %s", self.callback_path)
                with contextlib.suppress(Exception):
                    await _send_json(send, 500, models.answer_body(500, "internal_error"))
            return
        await super().__call__(scope, receive, send)


async def _send_json(send: Send, status: int, answer: bytes, allow: bool = False) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(answer)).encode())]
    if allow:
        headers.append((b"allow", b"POST"))
    if status in _CLOSING:  # the rest of what the client sends is not read: no next request on it
        headers.append((b"connection", b"close"))
    start: HTTPResponseStartEvent = {"type": "http.response.start", "status": status, "headers": headers}
    await send(start)
    body_event: HTTPResponseBodyEvent = {"type": "http.response.body", "body": answer, "more_body": False}
    await send(body_event)


_CLOSING = frozenset({408, 431})


class BodyDeadlines:
    """The body timeout: every request's body must arrive within ``seconds``.

    One sweep a tenth of the timeout (at most 0.1 s) cancels the reads that are past their deadline,
    rather than a timer per request (``asyncio.timeout`` costs ~6 µs, several percent of a callback);
    a slow body is answered 408 within 10 % of the timeout.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._reading: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # the sweep's (``get_running_loop`` costs)

    async def sweep(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(self.seconds / 10, 0.1))
            now = loop.time()
            for task, deadline in list(self._reading.items()):
                if deadline <= now and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()

    async def read(self, receive: Receive, declared: int | None, limit: int) -> tuple[bytes, bool, bool]:
        """(body, truncated, timed out): :func:`read_body` within the deadline."""
        loop = self._loop or asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        self._reading[task] = loop.time() + self.seconds
        try:
            body, truncated = await read_body(receive, declared, limit)
            return body, truncated, False
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            task.uncancel()
            return b"", False, True
        finally:
            del self._reading[task]
            self._expired.discard(task)


def make_callback_handler(
    settings: Settings, metrics: Metrics, deadlines: BodyDeadlines
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    limit = settings.max_body_bytes
    max_head, max_fields = settings.max_header_bytes, settings.max_headers
    proxies = tuple(ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies)

    async def callback(scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        received = time.time()
        headers = _headers(scope)
        client = scope.get("client")
        peer = client[0] if client else None
        extensions = scope.get("extensions")
        handed_over: dict[str, Any] | None = extensions.get(HEAD_EXTENSION) if extensions else None  # type: ignore[assignment]
        size = head_size(scope)
        if handed_over is None and size <= max_head and len(headers) <= max_fields:
            declared = _declared_length(headers)
            remote = checks.client_address(peer, _forwarded_for(headers), proxies) if proxies else peer
            body, truncated, timed_out = await deadlines.read(receive, declared, limit)
            request = checks.RawRequest(
                method=scope["method"],  # type: ignore[typeddict-item]
                path=scope["path"],
                query_string=scope["query_string"].decode("latin-1"),
                headers=headers,
                body=body,
                remote_addr=remote,
                declared_length=declared,
                body_truncated=truncated,
                timed_out=timed_out,
                client_cert=_client_cert(scope),
                head_bytes=size,
                header_count=len(headers),
            )
        else:  # the head alone is refused: its body is not read, the row keeps what fits the limits
            request = _refused_head(scope, headers, size, peer, handed_over or {}, max_head, max_fields)
        try:
            decision = checks.decide(request, settings, received)
        except Exception:
            log.exception("unexpected failure while checking a callback")
            decision = checks.Decision(
                500, "error", "internal_error", "unexpected failure; see the service log"
            )
        forwarder: Forwarder | None = scope["app"].state.forwarder
        forward = None
        if forwarder is not None and decision.authenticated and outbox.is_before(decision.command):
            answer, forward = await _ask_the_app(forwarder, request, decision, clock.iso(received))
        else:
            answer = models.answer_body(decision.status_code, decision.reason, decision.detail)
            if forwarder is not None:
                forward = forwarder.forward_for(decision)
        row = build_row(request, decision, received, time.perf_counter() - started, answer)
        writer: Writer = scope["app"].state.writer
        status = decision.status_code
        try:
            await writer.append(row, decision.event, forward)
            if forwarder is not None and forward is not None and forward.destinations:
                forwarder.wake()
        except AppendError:  # logged by the writer once per fault episode
            status = 503
            answer = models.answer_body(503, "audit_unavailable", "the request could not be recorded")
        await _send_json(send, status, answer, allow=status == 405)
        metrics.answered(decision.command, time.perf_counter() - started)

    return callback


def _forwarded_for(headers: tuple[tuple[str, str], ...]) -> list[str]:
    return [value for name, value in headers if name == "x-forwarded-for"]


def _refused_head(
    scope: Scope,
    headers: tuple[tuple[str, str], ...],
    size: int,
    peer: str | None,
    handed_over: dict[str, Any],
    max_head: int,
    max_fields: int,
) -> checks.RawRequest:
    """The request whose head is too large, or was handed over by the server (see
    :data:`HEAD_EXTENSION`), bounded: the first header fields that fit, the query cut to the limit, no
    body. ``remote_addr`` is the peer: nothing in a refused head is trusted."""
    kept = bounded_headers(headers, max_head, max_fields)
    query = scope["query_string"].decode("latin-1")
    return checks.RawRequest(
        method=str(scope.get("method", ""))[:32],
        path=scope["path"][:max_head],
        query_string=query[:max_head],
        headers=kept,
        body=b"",
        remote_addr=peer,
        client_cert=_client_cert(scope),
        head_bytes=max(size, int(handed_over.get("head_bytes", 0))),
        header_count=max(len(headers), int(handed_over.get("header_count", 0))),
        headers_truncated=kept != headers or bool(handed_over) or len(query) > max_head,
        head_timed_out=bool(handed_over.get("timed_out", False)),
    )


async def _ask_the_app(
    forwarder: Forwarder, request: checks.RawRequest, decision: checks.Decision, received_at: str
) -> tuple[bytes, Forward]:
    """A Before-callback goes to the app's handler first; its answer (the veto) is Tencent's answer.
    When our own checks refused the request, that refusal stands (the app's answer is still recorded)."""
    relayed, attempt = await forwarder.before(request, received_at)
    if decision.status_code != 200:
        return models.answer_body(decision.status_code, decision.reason, decision.detail), Forward(
            before=attempt
        )
    if relayed is not None:
        decision.detail = f"answered by the app's handler: {relayed[:200].decode('utf-8', 'replace')}"
        return relayed, Forward(before=attempt)
    decision.detail = (
        f"the app's handler gave no usable answer ({attempt.error}: {attempt.detail}); answered "
        f"{forwarder.settings.forward_before_on_failure}"
    )
    return forwarder.failure_answer, Forward(before=attempt)


def _error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Every error outside the callback route answers in the same JSON shape."""
    if isinstance(exc, HTTPException):
        status, reason = exc.status_code, _REASONS.get(exc.status_code, "http_error")
    else:
        log.error("unhandled exception on %s", request.url.path, exc_info=exc)
        status, reason = 500, "internal_error"
    return Response(models.answer_body(status, reason), status_code=status, media_type=MediaType.JSON)


_REASONS = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 400: "bad_request"}


@get("/healthz", sync_to_thread=False)
def healthz() -> Response[bytes]:
    """The process is up."""
    return Response(models.OK_BODY, media_type=MediaType.JSON)


@get("/readyz")
async def readyz(state: State) -> Response[bytes]:
    """The database takes a durable write now (the heartbeat row, committed by the writer)."""
    writer: Writer = state.writer
    try:
        await asyncio.wait_for(asyncio.wrap_future(writer.probe()), timeout=2.0)
    except Exception as exc:
        why = f"database not writable: {type(exc).__name__}"
        if isinstance(exc, AppendError) and state.settings.cluster:
            why = f"intake not writable: {exc}"
        return Response(
            models.answer_body(503, "not_ready", why),
            status_code=503,
            media_type=MediaType.JSON,
        )
    return Response(models.OK_BODY, media_type=MediaType.JSON)


@get("/metrics", sync_to_thread=False)
def metrics_endpoint(state: State) -> Response[bytes]:
    """Our metrics, then the process-wide registry (Litestar's HTTP metrics, process and GC metrics).

    With several worker processes (``serve --workers``), every worker's values, merged from
    ``PROMETHEUS_MULTIPROC_DIR`` (process and GC metrics are per process, so they are left out).
    """
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client.multiprocess import MultiProcessCollector

        merged = CollectorRegistry()
        MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        merged.register(state.metrics.erased_entries)  # read from the database: the same in every process
        return Response(generate_latest(merged), media_type=CONTENT_TYPE_LATEST)
    body = generate_latest(state.metrics.registry) + generate_latest(REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


READY_SECONDS = 30.0
"""Longest a receiver waits at start for the writer process to listen."""
GIL_SWITCH_SECONDS = 0.0005
"""The writer thread takes the GIL back after every SQLite call; with Python's default 5 ms interval it
waits up to that long each time the event loop is busy. Measured at 32 connections: p99 median 76 ms
(67 to 103, three runs) → 51 ms (39 to 78, five runs), throughput unchanged (docs/performance.md)."""


async def _forgetting(settings: Settings, metrics: Metrics, writer: Writer) -> None:
    """Retention, the body policy and the privacy metrics (:func:`topic_audit.writer.retention.start`),
    loaded in a thread once the receiver answers: what they import is not on the first callback's path."""
    try:
        retention = await asyncio.to_thread(importlib.import_module, "topic_audit.writer.retention")
        tasks: list[asyncio.Task[None]] = retention.start(settings, metrics, writer, clock.now)
    except Exception:  # said at once, not when the task is collected
        log.exception("retention, the body policy and the privacy metrics could not start")
        raise
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def from_environment(stream: Callable[[Settings, Metrics], Stream] | None = None) -> Litestar:
    """The app in a worker process started by ``serve``: settings from :data:`WORKER_SETTINGS`, the token
    from ``TOPIC_AUDIT_TOKEN``; in cluster mode, publishing to the intake ``stream`` makes."""
    configure_logging()
    settings = Settings.from_workers_json(
        os.environ[WORKER_SETTINGS], os.environ.get("TOPIC_AUDIT_TOKEN") or None
    )
    if settings.role == "receiver":  # cluster mode: the intake, in place of the writer process
        assert stream is not None, "a receiver in cluster mode needs its stream"
        metrics = Metrics()
        return create_app(settings, metrics, stream=stream(settings, metrics))
    socket, wake = os.environ.get(WRITER_SOCKET), None
    if settings.forward_url:  # the delivery process to wake: only a receiver that forwards loads it
        from topic_audit.forwarding.loop import DELIVERY_SOCKET

        wake = os.environ.get(DELIVERY_SOCKET)
    return create_app(
        settings,
        writer_socket=None if socket is None else Path(socket),
        delivery_socket=None if wake is None else Path(wake),
    )


def create_app(
    settings: Settings,
    metrics: Metrics | None = None,
    writer_socket: Path | None = None,
    delivery_socket: Path | None = None,
    stream: Stream | None = None,
) -> Litestar:
    """The receiver for ``settings``. With ``writer_socket``, the writer process listening there commits
    its rows (``serve``: :mod:`topic_audit.serve.writer_process`); without, it migrates the database and owns
    a writer thread for its lifetime. What it forwards is delivered by the delivery process listening on
    ``delivery_socket`` (``serve``'s one, :mod:`topic_audit.serve.delivery_process`), which it wakes;
    without, on its own event loop (:class:`topic_audit.forwarding.forwarder.LocalDelivery`).

    With ``stream`` (cluster mode), every callback is published there and answered once it is stored:
    no database, no checkpoints, no retention here; what is forwarded after the answer is delivered by
    the active writer."""
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        writer: AuditWriter | RemoteWriter | Stream
        if stream is not None:
            writer = stream
            await stream.open()
        elif writer_socket is not None:
            writer = RemoteWriter(writer_socket, refused=metrics.batch_failed)
            writer.start()  # serve starts the writer process beside the receivers: it may not listen yet
            await writer.connect(READY_SECONDS)
        else:
            from topic_audit.log.migrations import migrate
            from topic_audit.writer.thread import AuditWriter

            migrate(settings.db)
            writer = AuditWriter.serving(settings, metrics, create_key=True)
            writer.start()
        if stream is None:
            counts = await asyncio.wrap_future(writer.submit(jobs.Counts()))
            metrics.set_initial(*counts)
            metrics.set_policy(settings.retention_days, settings.checkpoint_seconds)  # retention loads later
        app.state.writer = writer
        forwarder = None
        if settings.forward_url:
            from topic_audit.forwarding.forwarder import Elsewhere, Forwarder, LocalDelivery
            from topic_audit.forwarding.loop import Waker

            delivery: Delivery
            if stream is not None:
                delivery = Elsewhere()
            elif delivery_socket is None:
                local = cast("AuditWriter | RemoteWriter", writer)  # (a stream was the case above)
                delivery = LocalDelivery(settings, metrics, local)
            else:
                delivery = Waker(delivery_socket)
            forwarder = Forwarder(settings, metrics, delivery)
            await forwarder.start()
        app.state.forwarder = forwarder
        # Under serve, the supervisor signs (here: interval 0); in cluster mode, the active writer.
        timer = None
        if stream is None and settings.checkpoint_seconds:
            from topic_audit.writer.checkpoint_timer import CheckpointTimer

            timer = CheckpointTimer(settings, at_start=False)
            timer.start()
        sweeper = asyncio.create_task(deadlines.sweep(), name="body-deadlines")
        forgetting = (
            None if stream is not None else asyncio.create_task(_forgetting(settings, metrics, writer))
        )
        gc.collect()  # what start-up built lives as long as the process: out of the collector's way
        gc.freeze()
        try:
            yield
        finally:
            sweeper.cancel()
            if forgetting is not None:
                forgetting.cancel()
            if forwarder is not None:
                await forwarder.stop()
            writer.stop()
            if timer is not None:
                await asyncio.to_thread(timer.stop)  # a last checkpoint covers everything answered

    # Litestar's own HTTP metrics, by route template. The callback route is left out: it has richer
    # metrics of its own, and its hot path stays free of a second middleware.
    http_metrics = PrometheusConfig(
        app_name="topic-audit",
        prefix="topic_audit_http",
        group_path=True,
        exclude=[f"^{re.escape(settings.callback_path)}$"],
        exclude_unhandled_paths=True,
    )
    deadlines = BodyDeadlines(settings.body_timeout_seconds)
    callback = make_callback_handler(settings, metrics, deadlines)
    app = Receiver(
        route_handlers=[
            asgi(settings.callback_path, copy_scope=False)(callback),
            healthz,
            readyz,
            metrics_endpoint,
        ],
        middleware=[http_metrics.middleware],
        lifespan=[lifespan],
        state=State({"settings": settings, "metrics": metrics, "forwarder": None}),
        exception_handlers={Exception: _error_response},
        openapi_config=None,
        request_max_body_size=settings.max_body_bytes,
    )
    app.callback_path, app.callback = settings.callback_path, callback
    return app
