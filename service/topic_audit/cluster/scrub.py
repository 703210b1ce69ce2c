"""Erasure reaching the intake: the active writer deletes from the intake streams every message whose
entry's content was erased -- on request, by retention, or by policy (``TOPIC_AUDIT_STORE_BODIES=topics``
records content it does not keep as an erasure) -- together with a second copy of it in the other stream.

JetStream's message delete overwrites the message in each replica's message blocks; each server's raft
log keeps its copy until it is compacted (within minutes; docs/cluster.md). Messages older than
``TOPIC_AUDIT_INTAKE_DAYS`` are gone from the streams anyway.

A message is deleted only once the replica holds the erasure: the newest *published* checkpoint covers
it (``erasures_size``; without a replica, the newest signed one). Deleted sooner, a writer taking over
from an older replica would find neither the erasure nor the message, and the entry would be lost; so
the stream keeps a copy for as long as the replica needs to catch up (seconds).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Final

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from topic_audit.log.database import read_only
from topic_audit.metrics import INTAKE_STREAMS, Metrics

log = logging.getLogger("topic_audit.cluster")

EVERY_SECONDS: Final = 5.0

_MESSAGES = """
SELECT copy.stream, copy.seq FROM erased_entries e
JOIN cluster_intake first ON first.entry_id = e.entry_id
JOIN cluster_intake copy ON copy.msg_id = first.msg_id
WHERE e.erasure_id > ? AND e.erasure_id <= ?
ORDER BY e.erasure_id
"""


def covered(checkpoint_file: Path, published: int | None) -> int:
    """The erasures the replica holds: ``erasures_size`` of checkpoint line ``published`` (None: the
    last line -- no replica), 0 when there is none."""
    try:
        lines = checkpoint_file.read_text().splitlines()
    except FileNotFoundError:
        return 0
    lines = [line for line in lines if line.strip()]
    if published is not None:
        lines = lines[:published]
    return int(json.loads(lines[-1]).get("erasures_size", 0)) if lines else 0


def messages(db: Path, after: int, upto: int) -> list[tuple[str, int]]:
    """The intake messages (stream, seq) of the entries erased by erasures ``after`` < id <= ``upto``."""
    conn = read_only(db)
    try:
        return [(stream, int(seq)) for stream, seq in conn.execute(_MESSAGES, (after, upto))]
    except sqlite3.OperationalError:  # a log without erasures or cluster_intake yet
        return []
    finally:
        conn.close()


class Scrubber:
    """The active writer's sweep: each erasure's messages deleted from the intake once replicated."""

    def __init__(
        self,
        js: JetStreamContext,
        db: Path,
        checkpoint_file: Path,
        published: Callable[[], int | None],
        metrics: Metrics,
    ) -> None:
        self.js, self.db, self.checkpoint_file, self.published = js, db, checkpoint_file, published
        self.metrics = metrics
        self.done = 0
        """Erasures whose messages are deleted (from 0 at each start: deleting again is harmless)."""

    async def run(self) -> None:
        while True:
            try:
                await self.once()
            except Exception as exc:  # no quorum now, a busy database: next time
                log.warning(
                    "intake messages of erased entries not deleted yet: %s: %s", type(exc).__name__, exc
                )
            await asyncio.sleep(EVERY_SECONDS)

    async def once(self) -> int:
        """Delete the messages of every erasure the replica holds and not handled yet; how many."""
        upto = await asyncio.to_thread(covered, self.checkpoint_file, self.published())
        if upto <= self.done:
            return 0
        found = await asyncio.to_thread(messages, self.db, self.done, upto)
        first = {name: (await self.js.stream_info(name)).state.first_seq for name in INTAKE_STREAMS}
        deleted = 0
        for stream, seq in found:
            if seq < first.get(stream, 0):
                continue  # expired already
            try:
                await self.js.delete_msg(stream, seq)
            except NotFoundError:
                continue  # deleted already (before this writer started), or expired
            deleted += 1
        self.metrics.intake_erased.inc(deleted)
        if deleted:
            log.info(
                "deleted %d messages of erased entries from the intake (erasures up to %d)", deleted, upto
            )
        self.done = upto
        return deleted
