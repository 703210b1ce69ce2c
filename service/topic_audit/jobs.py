"""The named jobs the writer runs between groups, on its connection: nobody else gets the connection.

A job is plain data (a frozen dataclass of strings, numbers and paths) and so is its result, so that
a job can be sent to a writer in another process (over a pipe) as well as queued to a thread:

========================  ==============================================  =============================
job                       what the writer does                            result
========================  ==============================================  =============================
:class:`Counts`           reads the log size and the topics per state     :class:`Counted`
:class:`Heartbeat`        commits the heartbeat row (a real durable       None
                          write: readiness, and the end of a fault
                          episode)
:class:`Checkpoint`       signs the head into the checkpoint file and     the checkpoint (a dict), or
                          table (:func:`checkpoints.make_checkpoint`)     None when a recent one stands
:class:`Pragmas`          reads the connection's durability pragmas       :class:`database.Durability`
:class:`Erase`            one erasure record and its entries' content     (entries erased, whether an
                          (:func:`erasure.erase_batch`), for retention    index held them)
:class:`Purge`            one step of :func:`purge.purge` (zero free    True once the step is done
                          pages, a merge step, truncate the WAL)
========================  ==============================================  =============================

Appending rows and recording delivery attempts are not jobs: they share the groups' transactions
(:mod:`topic_audit.append`).
"""

from __future__ import annotations

import math
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar, cast

from topic_audit import database, erasure, outbox, projection, purge, reindex
from topic_audit.checkpoints import Signer, make_checkpoint

T = TypeVar("T")


class Job(Generic[T]):
    """A job whose result is a ``T``."""

    __slots__ = ()


class Counted(NamedTuple):
    entries: int
    active: int
    deleted: int


@dataclass(frozen=True, slots=True)
class Counts(Job[Counted]):
    """The log's size and the topics active and deleted (``topic_counts``), for the gauges at start."""


@dataclass(frozen=True, slots=True)
class Heartbeat(Job[None]):
    """Commit the heartbeat row: proof that the database takes a durable write now."""


@dataclass(frozen=True, slots=True)
class Checkpoint(Job["dict[str, Any] | None"]):
    """Sign a checkpoint of the current head with the key at ``key_path``, appended to ``file``."""

    key_path: Path
    file: Path
    unless_within: float = 0.0
    """Sign nothing if the last checkpoint is younger than this many seconds (with several workers,
    each ticks: one checkpoint per interval is enough)."""


@dataclass(frozen=True, slots=True)
class Pragmas(Job[database.Durability]):
    """What the write connection promises about a commit."""


@dataclass(frozen=True, slots=True)
class Erase(Job["tuple[int, bool]"]):
    """Erase the content of entries ``ids`` under one record (``serve``'s retention and body policy run
    on the writer, between groups: no second writer waits for the lock)."""

    ids: tuple[int, ...]
    cause: str
    reason: str
    now: str


@dataclass(frozen=True, slots=True)
class Purge(Job[bool]):
    """One step of purging what SQLite keeps of erased values: ``wipe`` (free pages, a step of
    :func:`topic_audit.purge.wipe_step`), ``reindex`` (of
    ``table``, when its structure grew too long: :func:`topic_audit.reindex.step`), ``merge`` (of
    ``table``), ``truncate`` (the WAL)."""

    step: str
    table: str = ""


class Runner:
    """Runs jobs on the writer's connection, in the writer's thread; keeps the signing keys it loaded."""

    def __init__(self) -> None:
        self._signers: dict[Path, Signer] = {}

    def run(self, conn: sqlite3.Connection, job: Job[T]) -> T:
        return cast(T, self._run(conn, job))

    def _run(self, conn: sqlite3.Connection, job: Job[Any]) -> object:
        if isinstance(job, Counts):
            entries = conn.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()[0]
            found = projection.stored_counts(conn)
            return Counted(int(entries), int(found["active"]), int(found["deleted"]))
        if isinstance(job, Heartbeat):
            with database.transaction(conn):
                conn.execute(
                    "INSERT OR REPLACE INTO heartbeat (id, at) VALUES (1, strftime('%Y-%m-%dT%H:%M:%fZ'))"
                )
            return None
        if isinstance(job, Checkpoint):
            return self._checkpoint(conn, job)
        if isinstance(job, Pragmas):
            return database.durability(conn)
        if isinstance(job, Erase | Purge):
            return _forget(conn, job)
        raise TypeError(f"the writer has no job {type(job).__name__}")

    def _checkpoint(self, conn: sqlite3.Connection, job: Checkpoint) -> dict[str, Any] | None:
        if job.unless_within > 0:
            last = conn.execute("SELECT created_at FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()
            if last is not None and _age_seconds(last[0]) < job.unless_within:
                return None
        signer = self._signers.get(job.key_path)
        if signer is None:
            signer = self._signers[job.key_path] = Signer.load_or_create(job.key_path)[0]
        return make_checkpoint(conn, signer, job.file, outbox.now_iso())


def _forget(conn: sqlite3.Connection, job: Erase | Purge) -> object:
    was = int(conn.execute("PRAGMA secure_delete").fetchone()[0])
    conn.execute("PRAGMA secure_delete=ON")  # what an erasure frees is overwritten with zeros
    try:
        if isinstance(job, Erase):
            done = erasure.erase_batch(conn, job.ids, job.cause, job.reason, None, job.now)
            return (0, False) if done is None else (done.entries, done.indexed)
        if job.step == "wipe":
            return purge.wipe_step(conn)
        if job.step == "reindex":
            return reindex.step(conn, job.table)
        if job.step == "merge":
            return purge.merge_step(conn, job.table, 64)
        return purge.truncate_wal(conn)
    finally:
        conn.execute(f"PRAGMA secure_delete={was}")


def _age_seconds(iso: str) -> float:
    try:
        return time.time() - datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return math.inf
