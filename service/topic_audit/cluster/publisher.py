"""A receiver's writer in cluster mode: each callback is published to the intake, and answered only
once JetStream has acknowledged it (stored on a quorum of the stream's replicas).

It stands where the single-machine receiver has its writer (:class:`topic_audit.writer.thread.Writer`):
``append`` returns once the callback is durable, or raises :class:`AppendError` (answered 503, never
OK) when no intake stream acknowledged it within :data:`PUBLISH_SECONDS`. A publish not acknowledged in
:data:`topic_audit.cluster.jetstream.TRY_SECONDS` is sent again, with the same message id, to the other
intake stream (one whose leader died is unwritable for JetStream's election, 4-9 s); JetStream drops a
second copy in the same stream, and the writer records a copy that reached both without appending it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import Future
from typing import Any, Final, TypeVar

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from topic_audit.cluster import intake, jetstream
from topic_audit.forwarding.outbox import Forward
from topic_audit.log import content
from topic_audit.metrics import INTAKE_STREAMS, Metrics
from topic_audit.settings import Settings
from topic_audit.tencent import models
from topic_audit.writer import jobs
from topic_audit.writer.requests import AppendError, Committed

log = logging.getLogger("topic_audit.cluster")

PUBLISH_SECONDS: Final = 1.5
"""Longest a callback waits for the intake's acknowledgement: well inside Tencent's 2 s."""
ANSWER_BY_SECONDS: Final = 1.9
"""From receipt to answer at the latest: a callback that spent long being decided (a Before-callback
relayed to the app's handler) waits the less for the acknowledgement."""
PROBE_SECONDS: Final = 1.0
T = TypeVar("T")


class StreamWriter:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self._first = 0
        """The stream tried first: the one that answered last."""
        self.why_not: str | None = "not connected to the intake yet"
        """Why the last publish failed, until one succeeds (``/readyz`` says it)."""

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Nothing to start here: the connection is made on the app's event loop (:meth:`open`)."""

    async def open(self) -> None:
        self.nc = await jetstream.connect(self.settings, f"topic-audit receiver {jetstream.writer_name()}")
        self.js = self.nc.jetstream(timeout=jetstream.TRY_SECONDS)
        self.why_not = None

    def stop(self) -> None:
        if self.nc is not None:
            nc, self.nc = self.nc, None
            asyncio.get_running_loop().create_task(nc.drain())

    # -- the writer's part -----------------------------------------------------------------------
    async def append(
        self, row: dict[str, Any], event: models.TopicEvent | None = None, forward: Forward | None = None
    ) -> Committed:
        """Publish ``row`` and wait for the intake's acknowledgement (:class:`AppendError` if none came)."""
        if self.js is None:
            self.metrics.batch_failed(1)
            raise AppendError("not connected to the intake")
        data = intake.encode(row, event, forward, content.new_salt())
        headers = {"Nats-Msg-Id": uuid.uuid4().hex}
        loop = asyncio.get_running_loop()
        started = loop.time()
        which = self._first
        refused: set[int] = set()
        spent = float(row.get("elapsed_ms") or 0) / 1000  # deciding it: a Before-callback waited for the app
        budget = max(0.05, min(PUBLISH_SECONDS, ANSWER_BY_SECONDS - spent))
        deadline = started + budget
        try:
            async with asyncio.timeout(budget):  # however long one try blocks (a reconnect)
                while True:
                    # Each try ends by the deadline too: Python 3.11's asyncio.wait_for (inside nats-py's
                    # request) can swallow the timeout's cancellation when its answer comes at that moment,
                    # and the loop would then try again with no deadline at all.
                    left = deadline - loop.time()
                    if left <= 0:
                        raise TimeoutError
                    try:
                        await self.js.publish(  # its acknowledgement: stored on a quorum
                            jetstream.SUBJECTS[which],
                            data,
                            timeout=min(jetstream.TRY_SECONDS, left),
                            headers=headers,
                        )
                        break
                    except Exception as exc:  # timed out, no responders, refused: try the other stream
                        self.metrics.intake_publish_errors.labels(INTAKE_STREAMS[which]).inc()
                        self.why_not = f"{INTAKE_STREAMS[which]}: {type(exc).__name__} {exc}".strip()
                        if _refusal(exc):
                            refused.add(which)
                            if len(refused) == len(INTAKE_STREAMS):  # both said no: trying again won't help
                                raise TimeoutError from None
                        which = 1 - which
                        await asyncio.sleep(0.005)
        except TimeoutError:
            self.metrics.batch_failed(1)
            log.warning(
                "a callback was not acknowledged by the intake in %.3f s: %s",
                loop.time() - started,
                self.why_not,
            )
            raise AppendError(f"the intake did not acknowledge in time ({self.why_not})") from None
        self._first, self.why_not = which, None
        self.metrics.intake_publish_seconds.observe(loop.time() - started)
        self.metrics.intake_published_at.set(time.time())
        return Committed(0, "", None, "")  # stored, not yet an entry: the writer gives it its id

    def submit(self, job: jobs.Job[T]) -> Future[T]:
        future: Future[T] = Future()
        future.set_exception(AppendError(f"a receiver in cluster mode runs no {type(job).__name__}"))
        return future

    def probe(self) -> Future[None]:
        """Ready: connected, and one of the intake streams has a leader that answers."""
        return asyncio.run_coroutine_threadsafe(self._probe(), asyncio.get_running_loop())

    async def _probe(self) -> None:
        if self.nc is None or self.js is None or not self.nc.is_connected:
            raise AppendError("not connected to the intake")
        reasons = []
        for name in INTAKE_STREAMS:
            try:
                info = await self.js.stream_info(name)
            except Exception as exc:
                reasons.append(f"{name}: {type(exc).__name__}")
                continue
            if info.cluster is None or info.cluster.leader:
                return
            reasons.append(f"{name}: no leader")
        raise AppendError("; ".join(reasons))


def _refusal(exc: Exception) -> bool:
    """A stream's answer that it will not store the message (sealed, at its limits, too large), as
    opposed to no answer in time or no leader to give one."""
    return isinstance(exc, APIError) and not isinstance(exc, (ServiceUnavailableError, NoStreamResponseError))
