"""The writer thread: one thread owns the SQLite write connection and commits queued requests in groups.

Requests put an :class:`~topic_audit.writer.append.Append` (a log row) or a :class:`~topic_audit.writer.append.Record`
(delivery attempts) on a queue and await a future. The writer thread takes whatever is queued (up to
``max_batch`` requests) and commits it as one group (:class:`~topic_audit.writer.groups.Groups`, the loop
the writer process runs too: one transaction, one COMMIT, one fsync with ``synchronous=FULL``). Only then are the futures resolved, so no
answer is sent before its row is durable. A lone request commits at once; under load the queue fills
while a commit is in flight and the next transaction takes all of it (group commit).

Each transaction re-reads the chain head under ``BEGIN IMMEDIATE``, so writers in other processes on the
same file serialize on SQLite's lock and the chain stays contiguous.

Between groups the writer runs named jobs (:mod:`topic_audit.writer.jobs`: counts, heartbeat, checkpoint,
pragmas, erasure) and, now and then, housekeeping (:mod:`topic_audit.writer.housekeeping`: the full-text indexes;
the WAL checkpointer runs beside it). Nobody else gets the connection.

``serve`` runs the same committer in a process of its own instead (:mod:`topic_audit.serve.writer_process`),
which every receiver feeds over a socket (:class:`topic_audit.writer.client.RemoteWriter`, with this
class's methods): the answers then never wait for the writer's Python, nor the writer for theirs.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from topic_audit.forwarding import outbox
from topic_audit.log.database import BUSY_TIMEOUT_SECONDS, connect
from topic_audit.settings import Settings
from topic_audit.tencent import models
from topic_audit.transparency.checkpoints import record_key
from topic_audit.writer import jobs
from topic_audit.writer.append import Append, Committed, Forward, Record, append_batch
from topic_audit.writer.committer import AppendError, Committer, Observer
from topic_audit.writer.groups import Groups
from topic_audit.writer.housekeeping import SearchIndexer, WalCheckpointer
from topic_audit.writer.requests import Intake

__all__ = [
    "BUSY_TIMEOUT_SECONDS",
    "AppendError",
    "AuditWriter",
    "Committed",
    "Forward",
    "Observer",
    "Writer",
    "append_batch",
    "connect",
]

T = TypeVar("T")


class Writer(Protocol):
    """What the receiver asks of its writer, in this process (:class:`AuditWriter`) or in the writer
    process (:class:`topic_audit.writer.client.RemoteWriter`)."""

    async def append(
        self, row: dict[str, Any], event: models.TopicEvent | None = None, forward: Forward | None = None
    ) -> Committed: ...
    def submit(self, job: jobs.Job[T]) -> Future[T]: ...
    def probe(self) -> Future[None]: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...


@dataclass(slots=True)
class _Waiting:
    """The future a caller awaits on ``loop``."""

    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


_Key = _Waiting | Future[Any]
"""Whom to answer: a request's caller, or a job's (a thread's future)."""
_Item = tuple[_Key, Append | Record | jobs.Job[Any]]
_STOP = object()


class AuditWriter:
    def __init__(
        self,
        path: Path,
        max_batch: int = 256,
        observer: Observer | None = None,
        autocheckpoint: bool = True,
        store_bodies: str = "all",
        record_key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.path = path
        self.store_bodies = store_bodies
        self.record_key = record_key
        """Signs the erasure records the writer writes (the checkpoint signing key)."""
        self.autocheckpoint = autocheckpoint
        self.max_batch = max_batch
        self.observer = observer
        self._queue: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._committer: Committer | None = None
        self._wal_checkpointer: WalCheckpointer | None = None

    @classmethod
    def serving(cls, settings: Settings, observer: Observer, create_key: bool) -> AuditWriter:
        """The writer of a ``serve`` (or of cluster mode's active writer): its batch, bodies policy and
        signing key from ``settings``; the WAL left to Litestream to checkpoint when there is a replica.
        ``create_key``: make the signing key when absent (never in cluster mode, whose writers share one)."""
        return cls(
            settings.db,
            settings.max_batch,
            observer=observer,
            autocheckpoint=settings.replica_url is None,
            store_bodies=settings.store_bodies,
            record_key=record_key(settings.signing_key_path, create=create_key),
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the connection and start the thread; requests queued before now are taken first."""
        conn = connect(self.path, self.autocheckpoint)
        self._committer = committer = Committer(conn, self.observer, self.store_bodies, self.record_key)
        indexer = SearchIndexer(conn)
        self._stopped = False
        self._thread = threading.Thread(
            target=self._run, args=(committer, indexer), name="audit-writer", daemon=True
        )
        self._thread.start()
        if self.autocheckpoint:  # copies the WAL into the database file from a thread of its own
            self._wal_checkpointer = WalCheckpointer(self.path)
            self._wal_checkpointer.start()

    def stop(self) -> None:
        """Commit what is queued, then close the connection."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None
        if self._wal_checkpointer is not None:
            self._wal_checkpointer.stop()
            self._wal_checkpointer = None
        if self._committer is not None:
            self._committer.conn.close()
            self._committer = None

    # -- producers -------------------------------------------------------------------------------
    async def append(
        self,
        row: dict[str, Any],
        event: models.TopicEvent | None = None,
        forward: Forward | None = None,
        intake: Intake | None = None,
    ) -> Committed:
        """Queue ``row`` (every column but id and the chain; not changed) and wait until it is committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Committed] = loop.create_future()
        self._queue.put((_Waiting(future, loop), Append(row, event, forward, intake)))
        return await future

    def queue(self, request: Append) -> asyncio.Future[Committed]:
        """Queue ``request`` now (in the order of the calls) and return what to await: its commit."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Committed] = loop.create_future()
        self._queue.put((_Waiting(future, loop), request))
        return future

    async def record(self, attempts: list[outbox.Attempt], schedule: tuple[int, ...]) -> list[outbox.Attempt]:
        """Record delivery attempts (and move their outbox rows on) in the next group's transaction, so
        that they share its commit; returns the attempts that exhausted ``schedule``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[outbox.Attempt]] = loop.create_future()
        self._queue.put((_Waiting(future, loop), Record(attempts, schedule)))
        return await future

    def submit(self, job: jobs.Job[T]) -> Future[T]:
        """Run ``job`` on the writer thread, between groups; its result (or exception) in the future."""
        future: Future[T] = Future()
        self._queue.put((future, job))
        return future

    def probe(self) -> Future[None]:
        """A real durable write (the heartbeat row, committed): readiness, and the end of a fault episode."""
        return self.submit(jobs.Heartbeat())

    @property
    def failing(self) -> bool:
        """The last write failed and none has succeeded since."""
        return self._committer is not None and self._committer.failing

    # -- the writer thread -----------------------------------------------------------------------
    def _run(self, committer: Committer, indexer: SearchIndexer) -> None:
        get = self._queue.get
        groups = Groups[_Key](committer, self.max_batch, _answer, functools.partial(_run_job, committer))
        while True:
            try:
                first = get(timeout=indexer.wait_seconds())
            except queue.Empty:  # idle: a good moment to catch up on the search index
                indexer.idle(committer.failing)
                continue
            groups.take(self._queued(first))
            if self._stopped:
                indexer.finish(committer.failing)
                return
            indexer.after_group(self._queue.empty(), committer.failing)  # now and then, a small batch

    def _queued(self, item: object) -> Iterator[_Item]:
        """``item`` and what is queued behind it, up to ``max_batch`` requests and jobs (up to the stop,
        which sets ``_stopped``)."""
        get_nowait = self._queue.get_nowait
        for taken in range(self.max_batch):
            if taken:
                try:
                    item = get_nowait()
                except queue.Empty:
                    return
            if item is _STOP:
                self._stopped = True
                return
            yield cast(_Item, item)


def _run_job(committer: Committer, key: _Key, job: jobs.Job[Any]) -> None:
    future = cast(Future[Any], key)
    if not future.set_running_or_notify_cancel():  # the caller gave up (e.g. /readyz timed out)
        return
    try:
        result = committer.run(job)
    except BaseException as exc:  # the job's caller sees it
        future.set_exception(exc)
        return
    future.set_result(result)


def _answer(keys: list[_Key], results: list[Any]) -> None:
    """One wake-up per event loop for the whole group, not one per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for waiting, result in zip(cast(list[_Waiting], keys), results, strict=True):
        by_loop.setdefault(waiting.loop, []).append((waiting.future, result))
    for loop, pairs in by_loop.items():
        loop.call_soon_threadsafe(_settle, pairs)


def _settle(pairs: list[tuple[asyncio.Future[Any], Any]]) -> None:
    """Resolve each future with its result, or fail it with its :class:`AppendError`."""
    for future, result in pairs:
        if future.done():
            continue
        if isinstance(result, AppendError):
            future.set_exception(result)
        else:
            future.set_result(result)
