"""Sending a callback to the app's handler: what the receiver (Before-callbacks, :mod:`topic_audit.forwarding.forwarder`)
and the delivery process (after-callbacks, :mod:`topic_audit.serve.delivery_process`) both do.

- :func:`resign`: every attempt is re-signed (``RequestTime`` now, ``Sign`` recomputed) when a token is
  configured, so that the app's own freshness check passes on retries; the body is the bytes received.
- :class:`Sender`: one ``POST <destination>?<query>`` per attempt, never following redirects, with the
  request's ``Content-Type``; what it got is a :class:`Sent` (a 2xx answer within the timeout is a
  delivery, anything else an ``http_error``, ``timeout`` or ``connection_error``).
- :func:`tencent_answer`: whether the app's answer to a Before-callback may be relayed to Tencent.
- :func:`destination_label`: a destination's ``destination`` metric label.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from urllib.parse import urlsplit

import aiohttp
import msgspec
from yarl import URL

from topic_audit.forwarding import outbox
from topic_audit.tencent import checks

PER_DESTINATION = 32
"""Most attempts in flight to one destination at once."""
RESPONSE_READ_LIMIT = 16384


@functools.cache
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
        # request, which at 32 connections cost more CPU than the delivery itself (docs/performance.md, "Forwarding").
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=PER_DESTINATION + 1),
            skip_auto_headers=("Content-Type",),  # sent only when the request had one
            headers={"user-agent": _user_agent()},
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


def _user_agent() -> str:
    # importlib.metadata directly: topic_audit.metrics (prometheus_client) is not loaded by the
    # delivery process
    try:
        return f"topic-audit/{version('topic-audit')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "topic-audit/0+unknown"


def _since(started: float) -> float:
    return time.perf_counter() - started


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]
