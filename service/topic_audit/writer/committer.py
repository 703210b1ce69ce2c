"""What the writer does on its connection, wherever it runs: commit groups of requests, run jobs.

A :class:`Committer` owns the write connection. :meth:`Committer.commit` takes a group of requests
(:class:`~topic_audit.writer.append.Append`, :class:`~topic_audit.writer.append.Record`) and commits them in one
append transaction (:mod:`topic_audit.writer.append`), one COMMIT (one fsync with ``synchronous=FULL``); it
returns one result per request: a :class:`~topic_audit.writer.append.Committed` for a row, the exhausted attempts
for a record, or the :class:`AppendError` that request must be answered with (503). If a group fails,
its requests are retried one by one, so that a row that cannot be stored fails only its own request.
Fault episodes are logged once when they begin and once when they end.

Two front ends drive it: the writer thread of :class:`topic_audit.writer.thread.AuditWriter` (tests, tools and
``serve`` in one process) and the writer process (:mod:`topic_audit.serve.writer_process`, fed by every
receiver over a socket). Both answer a request only with what :meth:`~Committer.commit` returned, after
its COMMIT.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from topic_audit.writer import jobs
from topic_audit.writer.append import Append, Committed, Record, commit
from topic_audit.writer.requests import AppendError
from topic_audit.writer.runner import Runner

log = logging.getLogger("topic_audit.writer")

T = TypeVar("T")

Request = Append | Record


class Observer(Protocol):
    """What the writer reports (implemented by :class:`topic_audit.metrics.Metrics`)."""

    def batch_committed(self, rows: list[dict[str, Any]], seconds: float, head_id: int) -> None: ...
    def batch_failed(self, count: int) -> None: ...
    def topics_counted(self, active: int, deleted: int) -> None: ...


class Committer:
    """The write connection, and what is committed on it (one thread at a time)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        observer: Observer | None = None,
        store_bodies: str = "all",
        record_key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.conn = conn
        self.observer = observer
        self.store_bodies = store_bodies
        """``topics``: rows outside the topic family keep evidence only (:func:`topic_audit.writer.append.commit`)."""
        self.record_key = record_key
        """Signs the erasure records written here (policy, retention): the checkpoint signing key."""
        self._episode = _Episode(observer)
        self._jobs = Runner(record_key)

    @property
    def failing(self) -> bool:
        """The last write failed and none has succeeded since."""
        return self._episode.failed_rows > 0

    def commit(self, batch: Sequence[Request]) -> list[Any]:
        """Commit ``batch`` in one transaction (or, when that fails, each request alone); one result per
        request, an :class:`AppendError` for each that could not be committed."""
        if not batch:
            return []
        try:
            results = self._commit(batch)
        except Exception as exc:
            # Lock, disk and permission faults fail every row alike: fail the group at once. Anything
            # else may be one bad row: retry the rows one by one so that it fails alone.
            if len(batch) == 1 or isinstance(exc, sqlite3.OperationalError):
                return self._episode.failed(batch, exc)
            log.warning("a group of %d requests failed (%s); retrying them one by one", len(batch), exc)
            return [result for request in batch for result in self.commit([request])]
        self._episode.recovered()
        return results

    def run(self, job: jobs.Job[T]) -> T:
        """Run ``job`` on the connection (its exception, if any, goes to the caller)."""
        result = self._jobs.run(self.conn, job)
        if type(job) is jobs.Heartbeat:
            self._episode.recovered()
        return result

    def _commit(self, batch: Sequence[Request]) -> list[Any]:
        started = time.perf_counter()
        appends = [r for r in batch if type(r) is Append]
        records = [r for r in batch if type(r) is Record]
        done = commit(self.conn, appends, records, self.store_bodies, self.record_key)
        if self.observer is not None and appends:
            try:
                self.observer.batch_committed(done.rows, time.perf_counter() - started, done.committed[-1].id)
                if done.counts is not None:
                    self.observer.topics_counted(*done.counts)
            except Exception:  # the rows are committed: a reporting bug must not turn them into 503s
                log.exception("the writer's observer failed")
        committed, exhausted = iter(done.committed), iter(done.exhausted)
        return [next(committed) if type(r) is Append else next(exhausted) for r in batch]


class _Episode:
    """A fault episode: from the first failed write to the next that succeeds."""

    def __init__(self, observer: Observer | None) -> None:
        self.observer = observer
        self.failed_rows = 0

    def recovered(self) -> None:
        if self.failed_rows:
            log.warning("audit log writes recovered; %d rows were refused (answered 503)", self.failed_rows)
            self.failed_rows = 0

    def failed(self, batch: Sequence[Request], exc: Exception) -> list[Any]:
        rows = sum(type(r) is Append for r in batch)
        error = AppendError(f"{type(exc).__name__}: {exc}")
        if rows:  # only delivery records: their outbox rows stay pending and are attempted again
            if self.observer is not None:
                self.observer.batch_failed(rows)
            if not self.failed_rows:
                log.error(
                    "audit log writes failing (%s: %s); answering 503 until they succeed",
                    type(exc).__name__,
                    exc,
                )
            self.failed_rows += rows
        return [error] * len(batch)


__all__ = ["AppendError", "Committed", "Committer", "Observer", "Request"]
