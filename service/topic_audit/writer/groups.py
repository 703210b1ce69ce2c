"""Group commit: the one loop both forms of the writer run -- the writer thread
(:class:`topic_audit.writer.thread.AuditWriter`) and the writer process
(:class:`topic_audit.serve.writer_process.WriterServer`).

They differ in where requests come from (a queue between threads; the receivers' sockets) and how an
answer goes back (a future on the caller's event loop; a frame on its socket), not in what is committed
when: :meth:`Groups.take` commits what has arrived in order of arrival -- consecutive requests (log rows,
:class:`~topic_audit.writer.requests.Append`; delivery attempts, :class:`~topic_audit.writer.requests.Record`)
together, at most ``max_batch`` in one transaction (:meth:`~topic_audit.writer.committer.Committer.commit`:
one COMMIT, one fsync), each job (:mod:`topic_audit.writer.jobs`) between two groups -- and answers each
group once it is durable, never sooner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from topic_audit.writer import jobs
from topic_audit.writer.committer import Committer
from topic_audit.writer.requests import Append, Record

K = TypeVar("K")
"""Whom to answer: the caller's future (the thread), its socket and sequence number (the process)."""


class Groups(Generic[K]):
    """``answer(keys, results)`` gets each group's results (a result, or the
    :class:`~topic_audit.writer.requests.AppendError` that refused it); ``run(key, job)`` runs a job and
    answers it."""

    def __init__(
        self,
        committer: Committer,
        max_batch: int,
        answer: Callable[[list[K], list[Any]], None],
        run: Callable[[K, jobs.Job[Any]], None],
    ) -> None:
        self.committer, self.max_batch, self.answer, self.run = committer, max_batch, answer, run

    def take(self, items: Iterable[tuple[K, Append | Record | jobs.Job[Any]]]) -> None:
        """Commit and answer ``items``: groups of requests, jobs between them."""
        keys: list[K] = []
        group: list[Append | Record] = []
        max_batch = self.max_batch
        for key, request in items:
            if type(request) is Append or type(request) is Record:  # (the hot path: no isinstance)
                keys.append(key)
                group.append(request)
                if len(group) >= max_batch:
                    self._commit(keys, group)
                    keys, group = [], []
            else:
                if group:
                    self._commit(keys, group)
                    keys, group = [], []
                self.run(key, request)  # type: ignore[arg-type]
        if group:
            self._commit(keys, group)

    def _commit(self, keys: list[K], group: list[Append | Record]) -> None:
        self.answer(keys, self.committer.commit(group))
