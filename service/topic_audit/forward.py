"""Forwarding: topic-audit as an audited proxy in front of the app's own callback handler.

Tencent sends every callback of an app to one URL. When topic-audit holds it, the app's handler gets
every callback that passed the app-id and signature checks:

- **Before-callbacks** (the app may veto): :meth:`Forwarder.before` posts to the first destination
  before Tencent is answered, within ``forward_before_timeout_seconds``; a Tencent-shaped answer from the
  app is relayed byte for byte, anything else gets the ``forward_before_on_failure`` answer. Never retried.
- **Everything else**: the outbox rows are queued in the transaction that appends the log row
  (:class:`topic_audit.writer.Forward`), and the delivery process (:mod:`topic_audit.delivery`, a child
  of ``serve`` with its own interpreter, so that delivering never takes CPU from the answers) delivers
  them in the background.

Every attempt is re-signed (``RequestTime`` now, ``Sign`` recomputed) when a token is configured, so the
app's own freshness check passes on retries; the body is the bytes received.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import msgspec
from yarl import URL

from topic_audit import checks, models, outbox
from topic_audit.metrics import Metrics, package_version
from topic_audit.settings import Settings
from topic_audit.writer import Forward

PER_DESTINATION = 32
"""Most attempts in flight to one destination at once."""
RESPONSE_READ_LIMIT = 16384


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

    def text(self) -> str | None:
        """The answer as stored in ``deliveries.response_body`` (bounded)."""
        return self.body[: outbox.RESPONSE_LIMIT].decode("utf-8", "replace") if self.body else None


class Sender:
    """Posts callbacks to destinations: re-signed, byte-identical, never following redirects."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # aiohttp rather than httpx here: httpcore checks every pooled connection's socket on each
        # request, which at 32 connections cost more CPU than the delivery itself (README, Performance).
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=PER_DESTINATION + 1),
            skip_auto_headers=("Content-Type",),  # sent only when the request had one
            headers={"user-agent": f"topic-audit/{package_version()}"},
            auto_decompress=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

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
        url = URL(target(destination, resign(query_string, self.token, time.time())), encoded=True)
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


class Forwarder:
    """The receiver's side of forwarding: Before-callbacks, what to queue with each row, and the
    delivery process."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        from topic_audit.delivery import DeliveryProcess

        self.settings = settings
        self.metrics = metrics
        self.destinations = settings.forward_url
        self.failure_answer = (
            models.OK_BODY
            if settings.forward_before_on_failure == "allow"
            else models.encode_answer("OK", "the app's callback handler did not answer", 1)
        )
        self.sender = Sender(settings.token)
        self.delivery = DeliveryProcess(settings, metrics)
        self._label = destination_label(self.destinations[0])

    async def start(self) -> None:
        for destination in self.destinations:
            self.metrics.forwarding_to(destination_label(destination))
        await self.sender.start()
        self.delivery.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.delivery.stop)
        await self.sender.close()

    def wake(self) -> None:
        """Rows were queued: the delivery process looks at the outbox now."""
        self.delivery.wake()

    def forward_for(self, decision: checks.Decision) -> Forward | None:
        """What to queue with an after-callback's log row (None when it is not forwarded)."""
        if not decision.authenticated or outbox.is_before(decision.command):
            return None
        return Forward(self.destinations, float(self.settings.forward_retry_schedule[0]))

    async def before(
        self, request: checks.RawRequest, received_at: str
    ) -> tuple[bytes | None, outbox.Attempt]:
        """Forward a Before-callback to the first destination: (the app's answer to relay, or None when
        it gave none usable; the attempt, to record with the log row)."""
        destination = self.destinations[0]
        sent = await self.sender.send(
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
        self.metrics.attempted(self._label, "before", error or "delivered", sent.seconds)
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
            sent.text(),
        )
        return (sent.body if relayed else None), attempt


def _since(started: float) -> float:
    return time.perf_counter() - started


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]
