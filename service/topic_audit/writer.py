"""The single writer: one thread owns the SQLite write connection and commits queued requests in groups.

Requests put an :class:`~topic_audit.append.Append` (a log row) or a :class:`~topic_audit.append.Record`
(delivery attempts) on a queue and await a future. The writer thread takes whatever is queued (up to
``max_batch`` requests) and commits it in one append transaction (:mod:`topic_audit.append`), one
COMMIT (one fsync with ``synchronous=FULL``). Only then are the futures resolved, so no answer is sent
before its row is durable. A lone request commits at once; under load the queue fills while a commit is
in flight and the next transaction takes all of it (group commit).

Each transaction re-reads the chain head under ``BEGIN IMMEDIATE``, so writers in other processes on the
same file serialize on SQLite's lock and the chain stays contiguous. If a group fails, its requests are
retried one by one, so that a row that cannot be stored fails only its own request; the failure is
:class:`AppendError` (answered 503). Fault episodes are logged once when they begin and once when they end.

Between groups the writer runs named jobs (:mod:`topic_audit.jobs`: counts, heartbeat, checkpoint,
pragmas) and, now and then, housekeeping (:mod:`topic_audit.housekeeping`: the full-text indexes; the
WAL checkpointer runs beside it). Nobody else gets the connection.

Everything that crosses the queue is plain data: rows (dicts of strings and numbers), the decoded topic
events, delivery attempts and job dataclasses in; :class:`~topic_audit.append.Committed`, attempts and
job results out. This is the seam for a writer in a process of its own, fed over a pipe: the thread
and queue would become that process and the pipe, and :meth:`AuditWriter.append`, :meth:`~AuditWriter.record`
and :meth:`~AuditWriter.submit` would keep their signatures.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from topic_audit import jobs, models, outbox
from topic_audit.append import Append, Committed, Forward, Record, append_batch, commit
from topic_audit.database import BUSY_TIMEOUT_SECONDS, connect
from topic_audit.housekeeping import Checkpointer, SearchIndexer

__all__ = [
    "BUSY_TIMEOUT_SECONDS",
    "AppendError",
    "AuditWriter",
    "Committed",
    "Forward",
    "Observer",
    "append_batch",
    "connect",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class AppendError(Exception):
    """The row could not be committed; the request must be answered 503."""


class Observer(Protocol):
    """What the writer reports (implemented by :class:`topic_audit.metrics.Metrics`)."""

    def batch_committed(self, rows: list[dict[str, Any]], seconds: float, head_id: int) -> None: ...
    def batch_failed(self, count: int) -> None: ...
    def topics_counted(self, active: int, deleted: int) -> None: ...


@dataclass(slots=True)
class _Waiting:
    """A request in the queue, and the future its caller awaits on ``loop``."""

    request: Append | Record
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True)
class _Job:
    job: jobs.Job[Any]
    future: Future[Any]


_STOP = object()


class AuditWriter:
    def __init__(
        self,
        path: Path,
        max_batch: int = 256,
        observer: Observer | None = None,
        index_search: bool = True,
        autocheckpoint: bool = True,
        checkpointer: bool | None = None,
        store_bodies: str = "all",
    ) -> None:
        self.path = path
        self.store_bodies = store_bodies
        """``topics``: rows outside the topic family keep evidence only (:func:`topic_audit.append.commit`)."""
        self.autocheckpoint = autocheckpoint
        self.max_batch = max_batch
        self.observer = observer
        self.index_search = index_search
        """Keep the full-text index up to date between groups (the receiver's writer does; the delivery
        process's does not)."""
        self.checkpointer = autocheckpoint if checkpointer is None else checkpointer and autocheckpoint
        """Copy the WAL into the database file from a thread beside the writer
        (:class:`~topic_audit.housekeeping.Checkpointer`); one per receiver is enough (the delivery
        process's writer does not)."""
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._checkpointer: Checkpointer | None = None
        self._episode = _Episode(observer)
        self._jobs = jobs.Runner()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the connection and start the thread; requests queued before now are taken first."""
        self._conn = conn = connect(self.path, self.autocheckpoint)
        indexer = SearchIndexer(conn, self.index_search)
        self._thread = threading.Thread(
            target=self._run, args=(conn, indexer), name="audit-writer", daemon=True
        )
        self._thread.start()
        if self.checkpointer:
            self._checkpointer = Checkpointer(self.path)
            self._checkpointer.start()

    def stop(self) -> None:
        """Commit what is queued, then close the connection."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- producers -------------------------------------------------------------------------------
    async def append(
        self, row: dict[str, Any], event: models.TopicEvent | None = None, forward: Forward | None = None
    ) -> Committed:
        """Queue ``row`` (every column but id and the chain; not changed) and wait until it is committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Committed] = loop.create_future()
        self._queue.put(_Waiting(Append(row, event, forward), future, loop))
        return await future

    async def record(self, attempts: list[outbox.Attempt], schedule: tuple[int, ...]) -> list[outbox.Attempt]:
        """Record delivery attempts (and move their outbox rows on) in the next group's transaction, so
        that they share its commit; returns the attempts that exhausted ``schedule``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[outbox.Attempt]] = loop.create_future()
        self._queue.put(_Waiting(Record(attempts, schedule), future, loop))
        return await future

    def submit(self, job: jobs.Job[T]) -> Future[T]:
        """Run ``job`` on the writer thread, between groups; its result (or exception) in the future."""
        future: Future[T] = Future()
        self._queue.put(_Job(job, future))
        return future

    def probe(self) -> Future[None]:
        """A real durable write (the heartbeat row, committed): readiness, and the end of a fault episode."""
        return self.submit(jobs.Heartbeat())

    @property
    def failing(self) -> bool:
        """The last write failed and none has succeeded since."""
        return self._episode.failed_rows > 0

    # -- the writer thread -----------------------------------------------------------------------
    def _run(self, conn: sqlite3.Connection, indexer: SearchIndexer) -> None:
        get, get_nowait, max_batch = self._queue.get, self._queue.get_nowait, self.max_batch
        while True:
            try:
                item = get(timeout=indexer.wait_seconds())
            except queue.Empty:  # idle: a good moment to catch up on the search index
                indexer.idle(self.failing)
                continue
            batch: list[_Waiting] = []
            while True:
                if type(item) is _Waiting:
                    batch.append(item)
                elif type(item) is _Job:
                    self._commit_group(conn, batch)
                    batch = []
                    self._run_job(conn, item)
                else:  # _STOP
                    self._commit_group(conn, batch)
                    indexer.finish(self.failing)
                    return
                if len(batch) >= max_batch:
                    break
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
            self._commit_group(conn, batch)  # answers first; then, now and then, a small indexing batch
            indexer.after_group(self._queue.empty(), self.failing)

    def _run_job(self, conn: sqlite3.Connection, item: _Job) -> None:
        if not item.future.set_running_or_notify_cancel():  # the caller gave up (e.g. /readyz timed out)
            return
        try:
            result = self._jobs.run(conn, item.job)
        except BaseException as exc:  # the job's caller sees it
            item.future.set_exception(exc)
            return
        if type(item.job) is jobs.Heartbeat:
            self._episode.recovered()
        item.future.set_result(result)

    def _commit_group(self, conn: sqlite3.Connection, batch: list[_Waiting]) -> None:
        if not batch:
            return
        try:
            results = self._commit(conn, batch)
        except Exception as exc:
            # Lock, disk and permission faults fail every row alike: fail the group at once. Anything
            # else may be one bad row: retry the rows one by one so that it fails alone.
            if len(batch) == 1 or isinstance(exc, sqlite3.OperationalError):
                self._episode.failed(batch, exc)
                return
            log.warning("a group of %d requests failed (%s); retrying them one by one", len(batch), exc)
            for waiting in batch:
                self._commit_group(conn, [waiting])
            return
        self._episode.recovered()
        _resolve(batch, results)

    def _commit(self, conn: sqlite3.Connection, batch: list[_Waiting]) -> list[Any]:
        started = time.perf_counter()
        appends = [r for w in batch if isinstance(r := w.request, Append)]
        records = [r for w in batch if isinstance(r := w.request, Record)]
        done = commit(conn, appends, records, self.store_bodies)
        if self.observer is not None and appends:
            try:
                self.observer.batch_committed(done.rows, time.perf_counter() - started, done.committed[-1].id)
                if done.counts is not None:
                    self.observer.topics_counted(*done.counts)
            except Exception:  # the rows are committed: a reporting bug must not turn them into 503s
                log.exception("the writer's observer failed")
        committed, exhausted = iter(done.committed), iter(done.exhausted)
        return [next(committed) if type(w.request) is Append else next(exhausted) for w in batch]


class _Episode:
    """A fault episode: from the first failed write to the next that succeeds."""

    def __init__(self, observer: Observer | None) -> None:
        self.observer = observer
        self.failed_rows = 0

    def recovered(self) -> None:
        if self.failed_rows:
            log.warning("audit log writes recovered; %d rows were refused (answered 503)", self.failed_rows)
            self.failed_rows = 0

    def failed(self, batch: list[_Waiting], exc: Exception) -> None:
        rows = sum(type(w.request) is Append for w in batch)
        error = AppendError(f"{type(exc).__name__}: {exc}")
        for waiting in batch:
            waiting.loop.call_soon_threadsafe(_set_exception, waiting.future, error)
        if not rows:  # only delivery records: their outbox rows stay pending and are attempted again
            return
        if self.observer is not None:
            self.observer.batch_failed(rows)
        if not self.failed_rows:
            log.error(
                "audit log writes failing (%s: %s); answering 503 until they succeed", type(exc).__name__, exc
            )
        self.failed_rows += rows


def _resolve(batch: list[_Waiting], results: list[Any]) -> None:
    # One wake-up per event loop for the whole group, not one per request.
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for waiting, result in zip(batch, results, strict=True):
        by_loop.setdefault(waiting.loop, []).append((waiting.future, result))
    for loop, pairs in by_loop.items():
        loop.call_soon_threadsafe(_set_results, pairs)


def _set_results(pairs: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, result in pairs:
        if not future.done():
            future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
