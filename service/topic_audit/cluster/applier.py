"""The active writer's loop: the intake applied to the log, each message once, each stream in its order.

One ordered consumer of each intake stream (:data:`topic_audit.metrics.INTAKE_STREAMS`), from the
message after the last one applied from it (the highest ``cluster_intake.seq`` of that stream in the database:
committed with its entry, so that a restart or a failover resumes exactly there); no acknowledgements
and no durable consumer, whose position could be ahead of a database restored from the replica.
Messages are handed to the writer thread as they arrive from either stream, up to ``max_batch`` at a
time; each carries the sequence of the one before it in its stream, and the append refuses one that does
not follow the last applied (:class:`topic_audit.writer.requests.OutOfOrder`), so that no group refused
can leave a gap behind a later one committed. After any refusal, or a consumer that stopped delivering,
the loop starts again from the database.

The log's order is the order the writer applied the messages in. A writer taking over replays what the
replica lacks, perhaps interleaving the two streams differently: nothing it replays was handed out (a
checkpoint is published only once the replica holds what it covers, and receivers hand out no receipt).

Nothing is applied while the lease is in doubt (:meth:`topic_audit.cluster.lease.Lease.valid`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Final

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from topic_audit.cluster import intake, jetstream
from topic_audit.cluster.lease import Lease
from topic_audit.log import database
from topic_audit.log.database import read_only
from topic_audit.metrics import INTAKE_STREAMS, Metrics
from topic_audit.writer import append
from topic_audit.writer.requests import Append, Intake
from topic_audit.writer.thread import AuditWriter

log = logging.getLogger("topic_audit.cluster")

RETRY_SECONDS: Final = 1.0
"""The pause before starting again from the database after a refusal."""
IDLE_SECONDS: Final = 1.0
"""How often the streams are compared with what was delivered and applied (:meth:`Applier._check`)."""


def last_applied(db: Path) -> dict[str, int]:
    """The sequence of each intake stream the log has applied last (0 for none, and for a log not yet
    created or migrated)."""
    applied = dict.fromkeys(INTAKE_STREAMS, 0)
    if not db.exists():
        return applied
    conn = read_only(db)
    try:
        if database.exists(conn, "cluster_intake"):
            applied = {name: append.last_applied(conn, name) for name in INTAKE_STREAMS}
    finally:
        conn.close()
    return applied


class Applier:
    def __init__(
        self,
        js: JetStreamContext,
        writer: AuditWriter,
        db: Path,
        metrics: Metrics,
        lease: Lease,
        max_batch: int,
    ) -> None:
        self.js, self.writer, self.db, self.metrics, self.lease = js, writer, db, metrics, lease
        self.max_batch = max_batch
        self.applied: dict[str, int] = dict.fromkeys(INTAKE_STREAMS, 0)
        self.caught_up = asyncio.Event()
        """Set while nothing stored in the intake is left to apply."""
        self.why_not: str | None = None
        """Why the loop is not applying, while it is not."""
        self._pending: dict[str, int] = dict.fromkeys(INTAKE_STREAMS, 0)
        self._stalled: dict[str, int] = {}

    async def run(self) -> None:
        while True:
            self.applied = await asyncio.to_thread(last_applied, self.db)
            for name, seq in self.applied.items():
                self.metrics.intake_applied.labels(name).set(seq)
            try:
                await self._stored_times()
                await self._apply_from(dict(self.applied))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.why_not = f"{type(exc).__name__}: {exc}"
                self.caught_up.clear()
                log.error("applying the intake stopped (%s); starting again from the log", self.why_not)
                await asyncio.sleep(RETRY_SECONDS)

    async def _stored_times(self) -> None:
        """When the last messages applied were stored (a writer taking over reports it at once: the
        "Writer behind" alert compares it with the receivers' last acknowledgement)."""
        times = []
        for name, seq in self.applied.items():
            if seq:
                try:
                    stored = (await self.js.get_msg(name, seq)).time
                except Exception as exc:  # deleted (erased), expired, or not allowed: only a metric
                    log.debug("when %s %d was stored is unknown: %s", name, seq, exc)
                    continue
                if stored is not None:
                    times.append(stored.timestamp())
        if times:
            self.metrics.intake_applied_at.set(max(times))

    async def _apply_from(self, after: dict[str, int]) -> None:
        arrived: asyncio.Queue[Msg] = asyncio.Queue()
        delivered = dict(after)
        """Each consumer's position: the last message it handed over, applied or not yet."""

        async def arrive(msg: Msg) -> None:
            delivered[msg.metadata.stream] = msg.metadata.sequence.stream
            await arrived.put(msg)

        subs = []
        try:
            for name, subject in zip(INTAKE_STREAMS, jetstream.SUBJECTS, strict=True):
                last = after[name]
                start = (
                    ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last + 1)
                    if last
                    else ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
                )
                subs.append(
                    await self.js.subscribe(
                        subject, stream=name, ordered_consumer=True, config=start, cb=arrive
                    )
                )
            log.info("applying the intake from %s", ", ".join(f"{n} {s + 1}" for n, s in after.items()))
            self._stalled = {}
            checked = time.monotonic()
            while True:
                first: Msg | None = None
                with contextlib.suppress(TimeoutError):  # not wait_for: in 3.11 it can drop a cancellation
                    async with asyncio.timeout(IDLE_SECONDS):
                        first = await arrived.get()
                if first is not None:
                    batch = [first]
                    while len(batch) < self.max_batch and not arrived.empty():
                        batch.append(arrived.get_nowait())
                    await self._apply(batch, after)
                if first is None or time.monotonic() - checked >= IDLE_SECONDS:  # however busy
                    await self._check(after, delivered)
                    checked = time.monotonic()
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):  # the connection is gone: so is the consumer
                    await sub.unsubscribe()

    async def _apply(self, batch: list[Msg], after: dict[str, int]) -> None:
        while not self.lease.valid():  # the lease in doubt: apply nothing
            self.why_not = "the writer lease is not confirmed"
            await asyncio.sleep(0.05)
        self.why_not = None
        waiting = []
        newest: dict[str, Any] = {}
        for msg in batch:
            meta = msg.metadata
            name, seq = meta.stream, meta.sequence.stream
            msg_id = (msg.headers or {}).get("Nats-Msg-Id") or f"{name}-{seq}"
            row, event, forward, salt = intake.decode(msg.data)
            message = Intake(name, seq, after[name], msg_id, salt, self.lease.valid_until)
            request = Append(row, event, forward, message)
            waiting.append(self.writer.queue(request))
            after[name] = seq
            newest[name] = meta
        for future in waiting:
            await future  # an AppendError stops the loop: it starts again from the log
        for name, meta in newest.items():
            self.applied[name] = meta.sequence.stream
            self._pending[name] = meta.num_pending
            self.metrics.intake_applied.labels(name).set(meta.sequence.stream)
        stored = max(m.timestamp.timestamp() if m.timestamp else time.time() for m in newest.values())
        self.metrics.intake_applied_at.set(stored)
        pending = sum(self._pending.values())
        self.metrics.intake_lag.set(pending)
        self.metrics.intake_lag_seconds.set(max(0.0, time.time() - stored) if pending else 0.0)
        if pending == 0:
            self.caught_up.set()
        else:
            self.caught_up.clear()

    async def _check(self, after: dict[str, int], delivered: dict[str, int]) -> None:
        """Every second, busy or not: how far behind the streams the log is, and whether a consumer has
        stopped delivering while its stream holds more (one whose re-creation failed while the stream
        had no quorum is not re-created again; the other stream's traffic would hide it). Seen at two
        checks in a row, the loop starts again from the log."""
        behind = 0
        for name in INTAKE_STREAMS:
            stored = (await self.js.stream_info(name)).state.last_seq
            behind += max(0, stored - after[name])
            if stored > delivered[name]:
                if self._stalled.get(name) == delivered[name]:
                    self.metrics.intake_lag.set(behind)
                    raise Stalled(
                        f"{name} holds {stored - delivered[name]} messages not delivered to the writer"
                    )
                self._stalled[name] = delivered[name]
            else:
                self._stalled.pop(name, None)
        self.metrics.intake_lag.set(behind)
        if behind == 0:
            self._pending = dict.fromkeys(INTAKE_STREAMS, 0)
            self.metrics.intake_lag_seconds.set(0)
            self.caught_up.set()


class Stalled(RuntimeError):
    """A consumer delivers nothing while its stream holds messages not applied."""
