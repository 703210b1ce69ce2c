"""Forwarding: topic-audit as an audited proxy in front of the app's own callback handler; the receiver's
side of it.

Tencent sends every callback of an app to one URL. When topic-audit holds it, the app's handler gets
every callback that passed the app-id and signature checks:

- **Before-callbacks** (the app may veto): :meth:`Forwarder.before` posts to the first destination
  before Tencent is answered, within ``forward_before_timeout_seconds``; a Tencent-shaped answer from the
  app is relayed byte for byte, anything else gets the ``forward_before_on_failure`` answer. Never retried.
- **Everything else**: the outbox rows are queued in the transaction that appends the log row
  (:class:`topic_audit.writer.thread.Forward`), and delivered in the background: under ``serve`` by its
  one delivery process (:mod:`topic_audit.serve.delivery_process`, a child of the supervisor with its
  own interpreter, so that delivering never takes CPU from the answers), which the receiver wakes on its
  socket (:class:`topic_audit.forwarding.loop.Waker`); in the app alone (tests, tools) by
  :class:`LocalDelivery`, on the app's own event loop. Either way :func:`apply` turns the deliverer's
  reports into metrics.

Sending and re-signing, which both sides do, are :mod:`topic_audit.forwarding.sending`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from typing import Protocol

from topic_audit.forwarding import loop, outbox
from topic_audit.forwarding.deliverer import Writer
from topic_audit.forwarding.outbox import Forward
from topic_audit.forwarding.sending import Sender, content_type, destination_label, tencent_answer
from topic_audit.metrics import Metrics
from topic_audit.settings import Settings
from topic_audit.tencent import checks, models

log = logging.getLogger("topic_audit.forward")


class Forwarder:
    """The receiver's side of forwarding: Before-callbacks, what to queue with each row, and waking
    whoever delivers it."""

    def __init__(self, settings: Settings, metrics: Metrics, delivery: Delivery) -> None:
        self.settings = settings
        self.metrics = metrics
        self.destinations = settings.forward_url
        self.failure_answer = (
            models.OK_BODY
            if settings.forward_before_on_failure == "allow"
            else models.encode_answer("OK", "the app's callback handler did not answer", 1)
        )
        self.sender = Sender(settings.token)
        self.delivery = delivery
        self._label = destination_label(self.destinations[0])

    async def start(self) -> None:
        for destination in self.destinations:
            self.metrics.forwarding_to(destination_label(destination))
        await self.sender.start()

    async def stop(self) -> None:
        await self.delivery.stop()
        await self.sender.close()

    def wake(self) -> None:
        """Rows were queued: whoever delivers looks at the outbox now."""
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


class Delivery(Protocol):
    """Who delivers what the receiver queued: serve's delivery process (reached by a
    :class:`~topic_audit.forwarding.loop.Waker`) or :class:`LocalDelivery`."""

    def wake(self) -> None: ...
    async def stop(self) -> None: ...


class Elsewhere:
    """Cluster mode: a receiver queues what it forwards with the callback; the active writer delivers
    it (with a :class:`LocalDelivery` of its own), so there is nobody here to wake."""

    def wake(self) -> None:
        pass

    async def stop(self) -> None:
        pass


class LocalDelivery:
    """The app alone delivers on its own event loop (from now on: made on the loop), taking the forwarder
    lock as serve's delivery process does; the attempts are recorded through the app's writer, the
    reports applied to its metrics."""

    def __init__(self, settings: Settings, metrics: Metrics, writer: Writer | None) -> None:
        self.deliverer, self._task = loop.start(settings, writer, functools.partial(apply, metrics))

    def wake(self) -> None:
        self.deliverer.wake()

    async def stop(self) -> None:
        """Abandon the attempts under way (attempted again later), record the finished ones."""
        self._task.cancel()  # once: its clean-up records the finished attempts (and no wait_for drops it)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def apply(metrics: Metrics, line: bytes) -> None:
    """A report line from the delivery process (:meth:`topic_audit.forwarding.deliverer.Report.line`), applied to
    ``serve``'s metrics."""
    report = json.loads(line)
    for label, result, seconds in report["attempts"]:
        metrics.attempted(label, "after", result, seconds)
    for label, count in report["exhausted"].items():
        metrics.forward_failed.labels(label).inc(count)
    for label, (pending, age) in report["backlog"].items():
        metrics.forward_pending.labels(label).set(pending)
        metrics.forward_oldest_pending.labels(label).set(age)
