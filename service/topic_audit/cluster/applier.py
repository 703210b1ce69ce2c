"""The active writer's loop: the intake applied to the log, in the stream's order, each message once.

An ordered consumer of :data:`topic_audit.cluster.jetstream.STREAM` from the message after the last
one applied (the highest ``intake.seq`` in the database: committed with its entry, so a restart or a
failover resumes exactly there); no acknowledgements and no durable consumer, whose position could be
ahead of a database restored from the replica. Messages are handed to the writer thread in order, up to
``max_batch`` at a time; each carries the sequence of the one before it, and the append refuses one that
does not follow the last applied (:class:`topic_audit.writer.requests.OutOfOrder`), so that no group
refused can leave a gap behind a later one committed. After any refusal the loop starts again from the
database.

Nothing is applied while the lease is in doubt (:meth:`topic_audit.cluster.lease.Lease.valid`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Final

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from topic_audit.cluster import intake, jetstream
from topic_audit.cluster.lease import Lease
from topic_audit.log.database import read_only
from topic_audit.metrics import Metrics
from topic_audit.writer.requests import Append, Intake
from topic_audit.writer.thread import AuditWriter

log = logging.getLogger("topic_audit.cluster")

RETRY_SECONDS: Final = 1.0
"""The pause before starting again from the database after a refusal."""


def last_applied(db: Path) -> int:
    """The intake sequence the log has applied last (0 for none)."""
    if not db.exists():
        return 0
    conn = read_only(db)
    try:
        found = conn.execute("SELECT max(seq) FROM intake").fetchone()
    finally:
        conn.close()
    return int(found[0] or 0)


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
        self.applied = 0
        self.caught_up = asyncio.Event()
        """Set while nothing stored in the intake is left to apply."""
        self.why_not: str | None = None
        """Why the loop is not applying, while it is not."""

    async def run(self) -> None:
        while True:
            self.applied = await asyncio.to_thread(last_applied, self.db)
            self.metrics.intake_applied.set(self.applied)
            try:
                await self._apply_from(self.applied)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.why_not = f"{type(exc).__name__}: {exc}"
                self.caught_up.clear()
                log.error("applying the intake stopped (%s); starting again from the log", self.why_not)
                await asyncio.sleep(RETRY_SECONDS)

    async def _apply_from(self, last: int) -> None:
        start = (
            ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last + 1)
            if last
            else ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        )
        sub = await self.js.subscribe(
            f"{jetstream.SUBJECTS[0].rsplit('.', 1)[0]}.>",
            stream=jetstream.STREAM,
            ordered_consumer=True,
            config=start,
            pending_msgs_limit=4 * self.max_batch + 1024,
        )
        log.info("applying the intake from sequence %d", last + 1)
        try:
            after = last
            while True:
                try:
                    first = await sub.next_msg(timeout=1.0)
                except NatsTimeout:
                    self._idle()
                    continue
                batch = [first]
                while len(batch) < self.max_batch and sub.pending_msgs > 0:
                    batch.append(await sub.next_msg(timeout=1.0))
                after = await self._apply(batch, after)
        finally:
            with contextlib.suppress(Exception):  # the connection is gone: so is the consumer
                await sub.unsubscribe()

    async def _apply(self, batch: list[Msg], after: int) -> int:
        while not self.lease.valid():  # the lease in doubt: apply nothing
            self.why_not = "the writer lease is not confirmed"
            await asyncio.sleep(0.05)
        self.why_not = None
        waiting = []
        for msg in batch:
            seq = msg.metadata.sequence.stream
            msg_id = (msg.headers or {}).get("Nats-Msg-Id") or f"seq-{seq}"
            row, event, forward, salt = intake.decode(msg.data)
            waiting.append(self.writer.queue(Append(row, event, forward, Intake(seq, after, msg_id, salt))))
            after = seq
        for future in waiting:
            await future  # an AppendError stops the loop: it starts again from the log
        last = batch[-1].metadata
        self.applied = last.sequence.stream
        self.metrics.intake_applied.set(self.applied)
        stored = last.timestamp.timestamp() if last.timestamp else time.time()
        self.metrics.intake_applied_at.set(stored)
        self.metrics.intake_lag.set(last.num_pending)
        self.metrics.intake_lag_seconds.set(max(0.0, time.time() - stored) if last.num_pending else 0.0)
        if last.num_pending == 0:
            self.caught_up.set()
        else:
            self.caught_up.clear()
        return after

    def _idle(self) -> None:
        """Nothing arrived for a second: everything stored is applied."""
        self.metrics.intake_lag.set(0)
        self.metrics.intake_lag_seconds.set(0)
        self.caught_up.set()
