"""Forwarding: topic-audit as an audited proxy in front of the app's own callback handler.

Tencent sends every callback of an app to one URL. When topic-audit holds it, the app's handler gets
every callback that passed the app-id and signature checks, from here:

- **Before-callbacks** (the app may veto): :meth:`Forwarder.before` posts to the first destination
  before Tencent is answered, within ``forward_before_timeout_seconds``; a Tencent-shaped answer from the
  app is relayed byte for byte, anything else gets the ``forward_before_on_failure`` answer. Never retried.
- **Everything else**: the outbox rows are queued in the transaction that appends the log row
  (:class:`topic_audit.writer.Forward`); :meth:`Forwarder.run` delivers them in the background following
  the retry schedule, at most :data:`PER_DESTINATION` at a time to each destination, so a slow or dead
  destination holds only its own slots. A delivery's outbox row stays pending until its attempt is
  recorded: a crash at any point means another attempt (at least once), never a lost one.

Every attempt is re-signed (``RequestTime`` now, ``Sign`` recomputed) when a token is configured, so the
app's own freshness check passes on retries; the body is the bytes received. With ``serve --workers``,
one process at a time (the holder of ``<db>.forwarder.lock``) delivers the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import msgspec
from yarl import URL

from topic_audit import checks, models, outbox
from topic_audit.metrics import Metrics, package_version
from topic_audit.settings import Settings
from topic_audit.writer import AuditWriter, Forward

log = logging.getLogger(__name__)

PER_DESTINATION = 32
"""Most attempts in flight to one destination at once."""
POLL_SECONDS = 1.0
"""Longest wait between looks at the outbox (retries fall due; other processes queue rows)."""
BACKLOG_SECONDS = 1.0
"""How often the pending gauges are refreshed."""
LOCK_RETRY_SECONDS = 2.0
RESPONSE_READ_LIMIT = 16384

T = TypeVar("T")


def destination_label(url: str) -> str:
    """The ``destination`` label: ``host:port``."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def resign(query_string: str, token: str | None, now: float) -> str:
    """The query as received, with ``RequestTime`` set to ``now`` and ``Sign`` recomputed (in place, or
    appended when absent). Unchanged without a token."""
    if token is None:
        return query_string
    request_time = str(int(now))
    fresh = {"RequestTime": request_time, "Sign": checks.sign(token, request_time)}
    parts = []
    for part in query_string.split("&"):
        name = part.split("=", 1)[0]
        if name in ("RequestTime", "Sign"):
            if name not in fresh:  # repeated: the first one is the signed one
                continue
            part = f"{name}={fresh.pop(name)}"
        if part:
            parts.append(part)
    parts += [f"{name}={value}" for name, value in fresh.items()]
    return "&".join(parts)


def target(destination: str, query: str) -> str:
    return f"{destination}{'&' if '?' in destination else '?'}{query}" if query else destination


def content_type(headers: tuple[tuple[str, str], ...] | str) -> str | None:
    """The request's Content-Type, from its headers or from the recorded ``request_headers`` JSON."""
    if isinstance(headers, str):
        try:
            value = msgspec.json.decode(headers).get("content-type")
        except (msgspec.DecodeError, AttributeError):
            return None
        return value if isinstance(value, str) else None
    return next((v for k, v in headers if k == "content-type"), None)


def tencent_answer(status: int | None, body: bytes) -> bool:
    """The app answered a Before-callback as Tencent expects: 200 and a JSON object with ``ActionStatus``
    and ``ErrorCode``."""
    if status != 200:
        return False
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return False
    return isinstance(document, dict) and "ActionStatus" in document and "ErrorCode" in document


@dataclass(frozen=True, slots=True)
class Sent:
    """What one attempt got: an HTTP answer, or an error without one."""

    status_code: int | None
    error: str | None
    detail: str | None
    body: bytes
    seconds: float


class Forwarder:
    def __init__(self, settings: Settings, writer: AuditWriter, metrics: Metrics) -> None:
        self.settings = settings
        self.writer = writer
        self.metrics = metrics
        self.destinations = settings.forward_url
        self.schedule = settings.forward_retry_schedule
        self.failure_answer = (
            models.OK_BODY
            if settings.forward_before_on_failure == "allow"
            else models.encode_answer("OK", "the app's callback handler did not answer", 1)
        )
        self._labels: dict[str, str] = {}
        self._session: aiohttp.ClientSession | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._attempts: set[asyncio.Task[None]] = set()
        self._in_flight: dict[str, set[int]] = {}
        self._results: list[outbox.Attempt] = []
        self._lock_file: int | None = None
        self._backlog_at = 0.0
        self._elsewhere: list[str] = []
        """Destinations with pending rows that are not configured (replayed elsewhere)."""

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        for destination in self.destinations:
            self.metrics.forwarding_to(self.label(destination))
        # aiohttp rather than httpx here: httpcore checks every pooled connection's socket on each request,
        # which at 32 connections cost more CPU than the receiver's own work (README, Performance).
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=PER_DESTINATION + 1),
            skip_auto_headers=("Content-Type",),  # sent only when the request had one
            headers={"user-agent": f"topic-audit/{package_version()}"},
            auto_decompress=False,
        )
        self._reader = sqlite3.connect(
            f"file:{self.settings.db}?mode=ro", uri=True, check_same_thread=False, timeout=5
        )
        self._task = asyncio.create_task(self.run(), name="forwarder")

    async def stop(self) -> None:
        """Stop delivering; attempts under way are abandoned (their outbox rows stay pending, so they are
        attempted again after the restart) and what was already attempted is recorded."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._attempts):
            task.cancel()
        await asyncio.gather(*self._attempts, return_exceptions=True)
        if self._flushing is not None:
            with contextlib.suppress(Exception):
                await self._flushing
        with contextlib.suppress(Exception):
            await self._flush()
        if self._session is not None:
            await self._session.close()
        if self._reader is not None:
            self._reader.close()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    def wake(self) -> None:
        """New rows were queued: look at the outbox now."""
        self._wake.set()

    def label(self, destination: str) -> str:
        label = self._labels.get(destination)
        if label is None:
            label = self._labels[destination] = destination_label(destination)
            self.metrics.forwarding_to(label)
        return label

    def forward_for(self, decision: checks.Decision) -> Forward | None:
        """What to queue with an after-callback's log row (None when it is not forwarded)."""
        if not decision.authenticated or outbox.is_before(decision.command):
            return None
        return Forward(self.destinations, float(self.schedule[0]))

    # -- sending ---------------------------------------------------------------------------------
    async def send(
        self,
        destination: str,
        query_string: str,
        body: bytes,
        kind_of_content: str | None,
        headers: dict[str, str],
        timeout: float,
    ) -> Sent:
        assert self._session is not None
        url = URL(target(destination, resign(query_string, self.settings.token, time.time())), encoded=True)
        if kind_of_content is not None:
            headers["content-type"] = kind_of_content
        started = time.perf_counter()
        status: int | None = None
        answer = bytearray()
        try:
            async with asyncio.timeout(timeout):
                async with self._session.post(
                    url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    status = response.status
                    while len(answer) < RESPONSE_READ_LIMIT:
                        chunk = await response.content.read(RESPONSE_READ_LIMIT - len(answer))
                        if not chunk:
                            break
                        answer += chunk
        except TimeoutError:
            return Sent(status, "timeout", f"no complete answer within {timeout:g} s", b"", _since(started))
        except (aiohttp.ClientError, OSError) as exc:
            return Sent(status, "connection_error", _describe(exc), b"", _since(started))
        seconds = _since(started)
        if not 200 <= status < 300:
            return Sent(status, "http_error", f"HTTP {status}", bytes(answer), seconds)
        return Sent(status, None, None, bytes(answer), seconds)

    async def before(
        self, request: checks.RawRequest, received_at: str
    ) -> tuple[bytes | None, outbox.Attempt]:
        """Forward a Before-callback to the first destination: (the app's answer to relay, or None when
        it gave none usable; the attempt, to record with the log row)."""
        destination = self.destinations[0]
        sent = await self.send(
            destination,
            request.query_string,
            request.body,
            content_type(request.headers),
            {"x-topic-audit-attempt": "1"},
            self.settings.forward_before_timeout_seconds,
        )
        error, detail = sent.error, sent.detail
        relayed = error is None and tencent_answer(sent.status_code, sent.body)
        if error is None and not relayed:
            error, detail = "http_error", "the answer is not a JSON object with ActionStatus and ErrorCode"
        self.metrics.attempted(self.label(destination), "before", error or "delivered", sent.seconds)
        attempt = outbox.Attempt(
            0,
            destination,
            "before",
            1,
            received_at,
            sent.seconds * 1000,
            sent.status_code,
            error,
            detail,
            _text(sent.body),
        )
        return (sent.body if relayed else None), attempt

    # -- the outbox ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Deliver what falls due, until cancelled."""
        while True:
            wait = POLL_SECONDS
            try:
                if self._holds_lock():
                    wait = await self._dispatch()
                    if time.monotonic() - self._backlog_at >= BACKLOG_SECONDS:
                        await self._report_backlog()
                else:
                    wait = LOCK_RETRY_SECONDS
            except Exception:
                log.exception("the forwarder could not read the outbox; trying again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()

    def _holds_lock(self) -> bool:
        """One process delivers the outbox (``serve --workers``): the holder of the lock file."""
        if self._lock_file is not None:
            return True
        path = Path(f"{self.settings.db}.forwarder.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_file = fd
        return True

    async def _read(self, query: Callable[..., T], *args: Any) -> T:
        async with self._read_lock:
            return await asyncio.to_thread(query, self._reader, *args)

    async def _dispatch(self) -> float:
        """Start the attempts that are due; the seconds until the next one falls due (at most a poll).

        Each look costs a few index steps per destination whatever the backlog: the destinations with
        pending rows beyond the configured ones (replays elsewhere) are listed with the backlog gauges.
        """
        now = outbox.now_iso()
        wait = POLL_SECONDS
        for destination in dict.fromkeys([*self.destinations, *self._elsewhere]):
            in_flight = self._in_flight.setdefault(destination, set())
            free = PER_DESTINATION - len(in_flight)
            if free > 0:
                for item in await self._read(outbox.due, destination, now, free, list(in_flight)):
                    in_flight.add(item.audit_id)
                    task = asyncio.create_task(self._deliver(item))
                    self._attempts.add(task)
                    task.add_done_callback(self._attempts.discard)
            upcoming = await self._read(outbox.next_due, destination)
            if upcoming is not None and len(in_flight) < PER_DESTINATION:
                wait = min(wait, max(_seconds_until(upcoming), 0.01))
        return wait

    async def _deliver(self, item: outbox.Due) -> None:
        attempt = item.attempts + 1
        started_at = outbox.now_iso()
        sent = await self.send(
            item.destination,
            item.query_string,
            item.body,
            content_type(item.request_headers),
            {"x-topic-audit-id": str(item.audit_id), "x-topic-audit-attempt": str(attempt)},
            self.settings.forward_timeout_seconds,
        )
        self.metrics.attempted(self.label(item.destination), "after", sent.error or "delivered", sent.seconds)
        self._results.append(
            outbox.Attempt(
                item.audit_id,
                item.destination,
                "after",
                attempt,
                started_at,
                sent.seconds * 1000,
                sent.status_code,
                sent.error,
                sent.detail,
                _text(sent.body),
                item.replay,
            )
        )
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        """Record the finished attempts (one transaction for all that are ready), then free their slots."""
        while self._results:
            batch, self._results = self._results, []
            try:
                exhausted = await self.writer.record(batch, self.schedule)
            except Exception as exc:  # the outbox rows stay pending: they are attempted again
                log.error(
                    "could not record %d delivery attempts (%s); they will be attempted again",
                    len(batch),
                    exc,
                )
                exhausted = []
            for attempt in exhausted:
                self.metrics.forward_failed.labels(self.label(attempt.destination)).inc()
                log.warning(
                    "delivery of entry %d to %s failed %d times; giving up (topic-audit replay --failed)",
                    attempt.audit_id,
                    self.label(attempt.destination),
                    attempt.attempt,
                )
            for attempt in batch:
                self._in_flight.get(attempt.destination, set()).discard(attempt.audit_id)
            self._wake.set()

    async def _report_backlog(self) -> None:
        self._backlog_at = time.monotonic()
        backlog = await self._read(outbox.backlog)
        self._elsewhere = [d for d in backlog if d not in self.destinations]
        now = time.time()
        for destination in dict.fromkeys([*self.destinations, *backlog]):
            label = self.label(destination)
            pending, oldest = backlog.get(destination, (0, None))
            self.metrics.forward_pending.labels(label).set(pending)
            age = max(now - _timestamp(oldest), 0.0) if oldest is not None else 0.0
            self.metrics.forward_oldest_pending.labels(label).set(age)


def _since(started: float) -> float:
    return time.perf_counter() - started


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]


def _text(body: bytes) -> str | None:
    if not body:
        return None
    return body[: outbox.RESPONSE_LIMIT].decode("utf-8", "replace")


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _seconds_until(iso: str) -> float:
    return _timestamp(iso) - time.time()
