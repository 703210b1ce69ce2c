"""Forwarding: topic-audit as an audited proxy in front of the app's own callback handler; the receiver's
side of it.

Tencent sends every callback of an app to one URL. When topic-audit holds it, the app's handler gets
every callback that passed the app-id and signature checks:

- **Before-callbacks** (the app may veto): :meth:`Forwarder.before` posts to the first destination
  before Tencent is answered, within ``forward_before_timeout_seconds``; a Tencent-shaped answer from the
  app is relayed byte for byte, anything else gets the ``forward_before_on_failure`` answer. Never retried.
- **Everything else**: the outbox rows are queued in the transaction that appends the log row
  (:class:`topic_audit.writer.thread.Forward`), and the delivery process (:mod:`topic_audit.serve.delivery_process`, a child
  of ``serve`` with its own interpreter, so that delivering never takes CPU from the answers) delivers
  them in the background. :class:`DeliveryProcess` starts it, wakes it, restarts it if it dies and
  applies its metric reports.

Sending and re-signing, which both sides do, are :mod:`topic_audit.forwarding.sending`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading

from topic_audit.forwarding import outbox
from topic_audit.forwarding.outbox import Forward
from topic_audit.forwarding.sending import Sender, content_type, destination_label, tencent_answer
from topic_audit.metrics import Metrics
from topic_audit.restarts import Backoff
from topic_audit.settings import WORKER_SETTINGS, Settings
from topic_audit.tencent import checks, models

log = logging.getLogger("topic_audit.forward")

FIRST_PAUSE_SECONDS = 1.0
MOST_PAUSE_SECONDS = 30.0
"""The pauses before another delivery process is started (:class:`topic_audit.restarts.Backoff`)."""


class Forwarder:
    """The receiver's side of forwarding: Before-callbacks, what to queue with each row, and the
    delivery process."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
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


class DeliveryProcess:
    """Starts the delivery process, restarts it if it dies, wakes it, applies its reports, stops it."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._backoff = Backoff(FIRST_PAUSE_SECONDS, MOST_PAUSE_SECONDS)

    def start(self) -> None:
        self._spawn()
        self._supervisor = threading.Thread(target=self._supervise, name="delivery-supervisor", daemon=True)
        self._supervisor.start()

    def wake(self) -> None:
        process = self._process
        if process is None or process.stdin is None:
            return
        with contextlib.suppress(BlockingIOError, BrokenPipeError, ValueError, OSError):
            os.write(process.stdin.fileno(), b"\x01")

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        process = self._process
        if process is not None:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()  # end of file: the child stops
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the delivery process did not stop in %g s; killing it", timeout)
                process.kill()
                process.wait(5)
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        if self._process is not process and self._process is not None:  # restarted meanwhile
            self._process.kill()
            self._process.wait(5)

    def _spawn(self) -> None:
        self._backoff.started()
        env = {**os.environ, WORKER_SETTINGS: self.settings.for_workers()}
        env.pop("TOPIC_AUDIT_TOKEN", None)
        if self.settings.token is not None:
            env["TOPIC_AUDIT_TOKEN"] = self.settings.token
        self._process = subprocess.Popen(
            [sys.executable, "-m", "topic_audit.serve.delivery_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self._process.stdin is not None
        os.set_blocking(self._process.stdin.fileno(), False)

    def _supervise(self) -> None:
        """Apply the child's reports; when it ends unasked, start another."""
        while True:
            process = self._process
            assert process is not None and process.stdout is not None
            for line in process.stdout:
                try:
                    apply(self.metrics, line)
                except (ValueError, KeyError, TypeError):
                    log.warning("unreadable report from the delivery process: %r", line[:200])
            code = process.wait()
            if self._stopping.is_set():
                return
            pause = self._backoff.ended()
            log.error("the delivery process ended (exit code %s); starting another in %g s", code, pause)
            if self._stopping.wait(pause):
                return
            self._spawn()


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
