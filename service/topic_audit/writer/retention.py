"""What ``serve`` forgets on its own.

Retention: every hour, the content of entries older than ``TOPIC_AUDIT_RETENTION_DAYS``
is erased (:func:`topic_audit.privacy.erasure.retain`), in records of :data:`BATCH` entries with a pause between
them, on a connection of its own: each batch holds the write lock for a few milliseconds, so answers
keep flowing (the writer waits at most one batch for the lock).

The body policy (``TOPIC_AUDIT_STORE_BODIES=topics``): a callback outside the topic family is written
without its content (:func:`topic_audit.privacy.erasure.record_policy`), unless it is to be forwarded; then its
content stays until every delivery of it is delivered or failed for good, and :meth:`OnTheWriter.sweep`
(every minute) erases it -- and, the first time, the content of such callbacks written before the policy.

Several receiver processes (``--workers``, a reload's old and new generation) may each run the timer:
a run takes an exclusive lock on ``<db>.retention.lock`` first, so only one runs at a time, and the
others skip that hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, TypeVar

from topic_audit import clock
from topic_audit.log.database import read_only
from topic_audit.metrics import Metrics
from topic_audit.privacy import erasure, purge
from topic_audit.settings import Settings
from topic_audit.tencent import models
from topic_audit.transparency import checkpoints
from topic_audit.writer import jobs
from topic_audit.writer.thread import Writer

log = logging.getLogger("topic_audit.retention")
T = TypeVar("T")

BATCH: Final = 25
"""Entries per retention record (one short transaction each) while ``serve`` answers."""
PAUSE_SECONDS: Final = 0.05
"""Between two batches: the writer's groups go first."""
EVERY_SECONDS: Final = 3600.0
FIRST_AFTER_SECONDS: Final = 5.0


@contextlib.contextmanager
def _exclusive(db: Path) -> Iterator[bool]:
    with open(f"{db}.retention.lock", "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


SWEEP_SECONDS: Final = 60.0
_NOT_TOPICS: Final = ", ".join(f"'{c}'" for c in models.TOPIC_COMMANDS)
SWEEP_IDS: Final = 5000
"""Ids one read of the sweep covers: a range of ids, not a number of matches, so that a round over
entries already erased (every callback the policy wrote without content) moves on all the same."""
_SWEPT: Final = (
    "SELECT a.id, EXISTS (SELECT 1 FROM outbox o WHERE o.audit_id = a.id AND o.state = 'pending') "
    f"FROM audit_log a WHERE a.id > ? AND a.id <= ? AND (a.callback_command IS NULL OR a.callback_command NOT IN ({_NOT_TOPICS})) "
    "AND NOT EXISTS (SELECT 1 FROM erased_entries e WHERE e.entry_id = a.id) ORDER BY a.id"
)


def _read(db: Path) -> sqlite3.Connection:
    return read_only(db)


def _older(db: Path, days: float) -> tuple[list[int], str]:
    conn = _read(db)
    try:
        return erasure.retention_plan(conn, timedelta(days=days))
    finally:
        conn.close()


def _swept(db: Path, after: int) -> tuple[list[tuple[int, int]], int]:
    """The callbacks to sweep after ``after`` (id, whether a delivery is pending), read :data:`SWEEP_IDS`
    ids at a time up to the first range holding any, and the last id read."""
    conn = _read(db)
    try:
        head = int(conn.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()[0])
        while after < head:
            upto = min(after + SWEEP_IDS, head)
            found = conn.execute(_SWEPT, (after, upto)).fetchall()
            if found:
                return [(int(i), int(p)) for i, p in found], upto
            after = upto
        return [], after
    finally:
        conn.close()


def _intact(db: Path, ids: list[int]) -> list[int]:
    conn = _read(db)
    try:
        found = erasure.tampered(conn, ids)
    finally:
        conn.close()
    if found:
        log.error("%s; the others are erased", erasure.Tampered(found))
    changed = {entry_id for entry_id, _ in found}
    return [i for i in ids if i not in changed]


class OnTheWriter:
    """Erasures run as jobs of ``serve``'s writer (:class:`topic_audit.writer.jobs.Erase`), a batch at a time
    with a pause between them: the groups of rows never wait for a second writer's lock."""

    def __init__(self, writer: Writer, now: Callable[[], str]) -> None:
        self.writer, self.now = writer, now

    async def _run(self, job: jobs.Job[T]) -> T:
        return await asyncio.wrap_future(self.writer.submit(job))

    async def erase(self, db: Path, ids: list[int], cause: str, reason: str) -> int:
        """Erase ``ids`` but those that fail their own check (logged: their content stays, as what shows
        the change, and the oldest content's age says retention is behind)."""
        ids = await asyncio.to_thread(_intact, db, ids)
        total, indexed = 0, False
        for start in range(0, len(ids), BATCH):
            erased, held = await self._run(
                jobs.Erase(tuple(ids[start : start + BATCH]), cause, reason, self.now())
            )
            total, indexed = total + erased, indexed or held
            await asyncio.sleep(PAUSE_SECONDS)
        if total:
            await self.purge(indexed)
        return total

    async def purge(self, merge: bool) -> None:
        """:func:`topic_audit.privacy.purge.plan`, each step a job of the writer, with a pause after each that
        is not done yet (the groups go first)."""
        steps = purge.plan(merge)
        try:
            step = next(steps)
            while True:
                done = await self._run(jobs.Purge.of(step))
                if not done:
                    await asyncio.sleep(max(PAUSE_SECONDS, purge.pause_after(step)))
                step = steps.send(done)
        except StopIteration as finished:
            complete = bool(finished.value)
        if not complete:
            log.warning(
                "the purge did not complete (an index did not settle in %d merge steps, or a reader -- "
                "Litestream -- kept the WAL): copies of erased values may linger until the next one",
                purge.MERGE_STEPS,
            )

    async def retain(self, db: Path, days: float) -> int:
        """One retention run (unless another process is running one): the entries erased."""
        with _exclusive(db) as mine:
            if not mine:
                return 0
            ids, reason = await asyncio.to_thread(_older, db, days)
            return await self.erase(db, ids, "retention", reason)

    async def sweep(self, db: Path, after: int) -> int:
        """Erase the content of callbacks outside the topic family after entry ``after`` whose deliveries
        are all done; returns the id up to which nothing is left to sweep (the next call's ``after``: the
        entry before the first still pending, or the last read), so a round reads only what is new."""
        with _exclusive(db) as mine:
            while mine:
                found, upto = await asyncio.to_thread(_swept, db, after)
                if upto <= after:
                    break
                done = [i for i, pending in found if not pending]
                if done:
                    await self.erase(db, done, "policy", erasure.POLICY_REASON)
                waiting = [i for i, pending in found if pending]
                if waiting:
                    return waiting[0] - 1
                after = upto
        return after


@dataclass
class Counted:
    """What earlier reads of the privacy metrics found, so that each reads only what is new: every entry
    below ``lowest`` is erased (erasure never gives content back), and the records up to ``records`` are
    summed in ``erased``."""

    lowest: int = 1
    records: int = 0
    erased: dict[str, int] = field(default_factory=dict)


_OLDEST: Final = (
    "SELECT id, received_at FROM audit_log a WHERE a.id >= ? AND NOT EXISTS "
    "(SELECT 1 FROM erased_entries e WHERE e.entry_id = a.id) ORDER BY a.id LIMIT 1"
)


def counts(db: Path, seen: Counted | None = None) -> tuple[dict[str, int], float]:
    """Entries erased by cause (from the records) and the age of the oldest content still kept (0: none),
    for ``topic_audit_erased_entries_total`` and ``topic_audit_oldest_content_age_seconds``; ``seen``
    carries what the last call read (then this one reads only what is new)."""
    seen = seen if seen is not None else Counted()
    conn = read_only(db)
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'erasures'").fetchone() is None:
            return {}, 0.0
        conn.execute("BEGIN")  # one snapshot
        new = conn.execute(
            "SELECT cause, sum(entries), max(id) FROM erasures WHERE id > ? GROUP BY cause", (seen.records,)
        ).fetchall()
        for cause, entries, last in new:
            seen.erased[cause] = seen.erased.get(cause, 0) + int(entries)
            seen.records = max(seen.records, int(last))
        oldest = conn.execute(_OLDEST, (seen.lowest,)).fetchone()
        if oldest is None:
            head = conn.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()[0]
            seen.lowest = int(head) + 1
        else:
            seen.lowest = int(oldest[0])
    finally:
        conn.close()
    if oldest is None:
        return dict(seen.erased), 0.0
    at = clock.parse(str(oldest[1]))
    return dict(seen.erased), (datetime.now(UTC) - at).total_seconds()


async def report(db: Path, counted: Callable[[dict[str, int], float], None], every: float = 15.0) -> None:
    """Keep the privacy metrics current (cancelled on shutdown)."""
    seen = Counted()
    while True:
        try:
            counted(*await asyncio.to_thread(counts, db, seen))
        except Exception:
            log.exception("could not read the erasure counts; will retry")
        await asyncio.sleep(every)


async def report_checkpoint_age(db: Path, age: Callable[[float], None], every: float = 5.0) -> None:
    """Keep ``topic_audit_checkpoint_age_seconds`` current (cancelled on shutdown): it grows when the
    signer refuses what does not verify (:mod:`topic_audit.writer.signer`), whichever process signs."""
    while True:
        try:
            age(await asyncio.to_thread(checkpoints.age_seconds, db))
        except Exception:
            log.exception("could not read the last checkpoint's time; will retry")
        await asyncio.sleep(every)


async def every_hour(on: OnTheWriter, db: Path, days: float) -> None:
    """The retention timer of ``serve`` (cancelled on shutdown; a failed run is logged and retried)."""
    await asyncio.sleep(FIRST_AFTER_SECONDS)
    while True:
        try:
            erased = await on.retain(db, days)
            if erased:
                log.info("retention: erased the content of %d entries older than %g days", erased, days)
        except Exception:
            log.exception("retention run failed; will retry in an hour")
        await asyncio.sleep(EVERY_SECONDS)


async def policy_every_minute(on: OnTheWriter, db: Path) -> None:
    """The body policy's sweep (forwarded callbacks outside the topic family, once delivered)."""
    after = 0
    while True:
        try:
            after = await on.sweep(db, after)
        except Exception:
            log.exception("body policy sweep failed; will retry")
        await asyncio.sleep(SWEEP_SECONDS)


def start(
    settings: Settings, metrics: Metrics, writer: Writer, now: Callable[[], str]
) -> list[asyncio.Task[None]]:
    """The tasks of ``serve`` that forget on their own, and keep the privacy metrics current."""
    metrics.set_policy(settings.retention_days, settings.checkpoint_seconds)
    db, on = settings.db, OnTheWriter(writer, now)
    tasks = [
        asyncio.create_task(report(db, metrics.privacy_counted), name="privacy-metrics"),
        asyncio.create_task(report_checkpoint_age(db, metrics.checkpoint_age.set), name="checkpoint-age"),
    ]
    if settings.retention_days:
        tasks.append(asyncio.create_task(every_hour(on, db, settings.retention_days), name="retention"))
    if settings.store_bodies == "topics":
        tasks.append(asyncio.create_task(policy_every_minute(on, db), name="body-policy"))
    return tasks
