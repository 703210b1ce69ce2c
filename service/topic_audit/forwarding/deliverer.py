"""Delivering the outbox, in the delivery process (:mod:`topic_audit.serve.delivery_process`).

:class:`Deliverer` attempts what falls due, following the retry schedule, at most
:data:`~topic_audit.forwarding.sending.PER_DESTINATION` at a time to each destination, so a slow or dead destination
holds only its own slots. Its pieces:

- :class:`OutboxReader`: the outbox's due rows and backlog, read on a read-only connection in a thread
  of its own;
- :class:`Recorder`: finished attempts, recorded together (at most every :data:`RECORD_SECONDS`) on the
  process's own write connection. An outbox row stays pending until its attempt is recorded, so a crash
  at any point means another attempt, never a lost one; meanwhile the entry is *unrecorded*, skipped
  when looking for due rows (no second attempt while the first is under way or unrecorded);
- :class:`Report`: the metric updates, which the process sends to ``serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from topic_audit import clock
from topic_audit.forwarding import outbox
from topic_audit.forwarding.sending import PER_DESTINATION, Sender, content_type, destination_label
from topic_audit.log import database
from topic_audit.log.database import read_only
from topic_audit.settings import Settings

log = logging.getLogger("topic_audit.deliverer")

POLL_SECONDS = 1.0
"""Longest wait between looks at the outbox (retries fall due; other processes queue rows)."""
BACKLOG_SECONDS = 1.0
"""How often the pending gauges are refreshed."""
RECORD_SECONDS = 0.1
"""Finished attempts are recorded together at most this often: ten records a second, not one per
answer. Under ``serve`` the writer process commits them in its groups, with the rows; a delivery
process of its own (tests, tools) holds the database's write lock ten short times a second."""

T = TypeVar("T")


class Report:
    """Metric updates gathered in the delivery process, sent to ``serve`` as one JSON line at a time
    (applied there by :func:`topic_audit.forwarding.forwarder.apply`)."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, str, float]] = []
        self.exhausted: Counter[str] = Counter()
        self.backlog: dict[str, tuple[int, float]] = {}

    def attempted(self, label: str, result: str, seconds: float) -> None:
        self.attempts.append((label, result, round(seconds, 6)))

    def line(self) -> bytes | None:
        if not (self.attempts or self.exhausted or self.backlog):
            return None
        line = json.dumps(
            {"attempts": self.attempts, "exhausted": self.exhausted, "backlog": self.backlog}
        ).encode()
        self.attempts, self.exhausted, self.backlog = [], Counter(), {}
        return line + b"\n"


class OutboxReader:
    """Runs the outbox's read queries on a read-only connection, one at a time, off the event loop."""

    def __init__(self, db: Path) -> None:
        self._conn = read_only(db)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="outbox-reader")

    async def __call__(self, query: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, query, self._conn, *args)

    def close(self) -> None:
        self._thread.shutdown()
        self._conn.close()


class Writer(Protocol):
    """What records attempts for the delivery process when ``serve`` runs a writer process: its client
    (:class:`topic_audit.writer.client.RemoteWriter`), which commits them in the writer's next group."""

    async def record(self, attempts: list[outbox.Attempt], schedule: tuple[int, ...]) -> list[outbox.Attempt]:
        """Record ``attempts``; answer those that exhausted the retry ``schedule``."""
        ...


class Recorder:
    """Records finished attempts in groups -- through ``serve``'s writer process when given one, which
    commits them in its next group; otherwise on a write connection of the delivery process's own (in a
    thread of its own) -- and tells which entries have an attempt under way or not yet recorded."""

    def __init__(
        self,
        settings: Settings,
        report: Report,
        recorded: Callable[[], None],
        writer: Writer | None = None,
    ) -> None:
        self.schedule = settings.forward_retry_schedule
        self.report = report
        self.recorded = recorded
        """Called after each group: its entries may be looked up again (a failed one falls due on the
        schedule)."""
        self._writer = writer
        self._conn: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None
        if writer is None:
            self._conn = database.connect(settings.db, autocheckpoint=settings.replica_url is None)
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="delivery-recorder")
        self._finished: list[outbox.Attempt] = []
        self._unrecorded: dict[str, set[int]] = {}

    def unrecorded(self, destination: str) -> set[int]:
        """The entries whose attempt to ``destination`` is under way or not recorded yet: the outbox still
        says pending for them (add to it when starting an attempt)."""
        return self._unrecorded.setdefault(destination, set())

    def finished(self, attempt: outbox.Attempt) -> None:
        self._finished.append(attempt)

    async def run(self) -> None:
        """Record what is finished every :data:`RECORD_SECONDS`, until cancelled."""
        while True:
            await asyncio.sleep(RECORD_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        """Record the finished attempts (all that are ready, in one group)."""
        while self._finished:
            batch, self._finished = self._finished, []
            try:
                exhausted = await self._record(batch)
            except Exception as exc:  # the outbox rows stay pending: they are attempted again
                log.error(
                    "could not record %d delivery attempts (%s); they will be attempted again",
                    len(batch),
                    exc,
                )
                exhausted = []
            for attempt in exhausted:
                label = destination_label(attempt.destination)
                self.report.exhausted[label] += 1
                log.warning(
                    "delivery of entry %d to %s failed %d times; giving up (topic-audit replay --failed)",
                    attempt.audit_id,
                    label,
                    attempt.attempt,
                )
            for attempt in batch:
                self.unrecorded(attempt.destination).discard(attempt.audit_id)
            self.recorded()

    async def _record(self, batch: list[outbox.Attempt]) -> list[outbox.Attempt]:
        if self._writer is not None:
            return await self._writer.record(batch, self.schedule)
        conn = self._conn
        assert conn is not None
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, outbox.record, conn, batch, self.schedule, clock.now()
        )

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown()  # a group being recorded is committed (or not) before it goes
        if self._conn is not None:
            self._conn.close()


class Deliverer:
    """Delivers the outbox until stopped (in the delivery process that holds the forwarder lock)."""

    def __init__(self, settings: Settings, report: Report, writer: Writer | None = None) -> None:
        self.settings = settings
        self.report = report
        self.writer = writer
        """``serve``'s writer process, which records the attempts (None: a write connection of its own)."""
        self.destinations = settings.forward_url
        self.sender = Sender(settings.token)
        self._wake = asyncio.Event()
        self._read: OutboxReader | None = None
        self._recorder: Recorder | None = None
        self._recording: asyncio.Task[None] | None = None
        self._attempts: set[asyncio.Task[None]] = set()
        self._sending: Counter[str] = Counter()
        """Attempts under way, per destination (at most PER_DESTINATION)."""
        self._backlog_at = 0.0
        self._elsewhere: list[str] = []
        """Destinations with pending rows that are not configured (replayed elsewhere)."""

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Deliver what falls due, until cancelled."""
        await self.sender.start()
        self._read = OutboxReader(self.settings.db)
        self._recorder = Recorder(self.settings, self.report, self._wake.set, self.writer)
        self._recording = asyncio.create_task(self._recorder.run())
        while True:
            wait = POLL_SECONDS
            try:
                wait = await self._dispatch()
                if time.monotonic() - self._backlog_at >= BACKLOG_SECONDS:
                    await self._report_backlog()
            except Exception:
                log.exception("could not read the outbox; trying again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()

    async def stop(self) -> None:
        """Abandon the attempts under way (their outbox rows stay pending, so they are attempted again
        after the restart); record what was already attempted."""
        for task in list(self._attempts):
            task.cancel()
        await asyncio.gather(*self._attempts, return_exceptions=True)
        if self._recording is not None:
            self._recording.cancel()
            with contextlib.suppress(BaseException):
                await self._recording
        if self._recorder is not None:
            with contextlib.suppress(Exception):
                await self._recorder.flush()
            self._recorder.close()
        await self.sender.close()
        if self._read is not None:
            self._read.close()

    async def _dispatch(self) -> float:
        """Start the attempts that are due; the seconds until the next one falls due (at most a poll).

        Each look costs a few index steps per destination whatever the backlog: the destinations with
        pending rows beyond the configured ones (replays elsewhere) are listed with the backlog gauges.
        """
        assert self._read is not None and self._recorder is not None
        now = clock.now()
        wait = POLL_SECONDS
        for destination in dict.fromkeys([*self.destinations, *self._elsewhere]):
            unrecorded = self._recorder.unrecorded(destination)
            free = PER_DESTINATION - self._sending[destination]
            if free > 0:
                for item in await self._read(outbox.due, destination, now, free, list(unrecorded)):
                    unrecorded.add(item.audit_id)
                    self._sending[destination] += 1
                    task = asyncio.create_task(self._deliver(item))
                    self._attempts.add(task)
                    task.add_done_callback(self._attempts.discard)
            upcoming = await self._read(outbox.next_due, destination)
            if upcoming is not None and self._sending[destination] < PER_DESTINATION:
                wait = min(wait, max(_timestamp(upcoming) - time.time(), 0.01))
        return wait

    async def _deliver(self, item: outbox.Due) -> None:
        assert self._recorder is not None
        attempt = item.attempts + 1
        started_at = clock.now()
        try:
            sent = await self.sender.send(
                item.destination,
                item.query_string,
                item.body,
                content_type(item.request_headers),
                {"x-topic-audit-id": str(item.audit_id), "x-topic-audit-attempt": str(attempt)},
                self.settings.forward_timeout_seconds,
            )
        finally:
            self._sending[item.destination] -= 1
            self._wake.set()  # a slot is free
        self.report.attempted(destination_label(item.destination), sent.error or "delivered", sent.seconds)
        self._recorder.finished(
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
                sent.text(),
                item.replay,
                item.queued_at,
            )
        )

    async def _report_backlog(self) -> None:
        assert self._read is not None
        self._backlog_at = time.monotonic()
        backlog = await self._read(outbox.backlog)
        self._elsewhere = [d for d in backlog if d not in self.destinations]
        now = time.time()
        for destination in dict.fromkeys([*self.destinations, *backlog]):
            pending, oldest = backlog.get(destination, (0, None))
            age = max(now - _timestamp(oldest), 0.0) if oldest is not None else 0.0
            self.report.backlog[destination_label(destination)] = (pending, round(age, 3))


def _timestamp(iso: str) -> float:
    return clock.seconds(iso)
