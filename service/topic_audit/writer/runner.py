"""Runs the writer's jobs (:mod:`topic_audit.writer.jobs`) on its connection, in its thread or process."""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path
from typing import Any, TypeVar, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from topic_audit import clock
from topic_audit.log import database, projection
from topic_audit.privacy import erasure, purge
from topic_audit.transparency.checkpoints import Signer
from topic_audit.writer.jobs import (
    Checkpoint,
    Counted,
    Counts,
    Erase,
    Heartbeat,
    Job,
    Pragmas,
    Purge,
)
from topic_audit.writer.signer import checkpoint

T = TypeVar("T")


class Runner:
    """Runs jobs on the writer's connection, in the writer's thread; keeps the signing keys it loaded."""

    def __init__(self, record_key: Ed25519PrivateKey | None = None) -> None:
        self._signers: dict[Path, Signer] = {}
        self.record_key = record_key
        """Signs the erasure records of :class:`Erase` jobs."""

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
            return _forget(conn, job, self.record_key)
        raise TypeError(f"the writer has no job {type(job).__name__}")

    def _checkpoint(self, conn: sqlite3.Connection, job: Checkpoint) -> dict[str, Any] | None:
        if job.unless_within > 0:
            last = conn.execute("SELECT created_at FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()
            if last is not None and _age_seconds(last[0]) < job.unless_within:
                return None
        signer = self._signers.get(job.key_path)
        if signer is None:
            signer = self._signers[job.key_path] = Signer.load_or_create(job.key_path)[0]
        return checkpoint(conn, signer, job.file, clock.now())


def _forget(conn: sqlite3.Connection, job: Erase | Purge, key: Ed25519PrivateKey | None) -> object:
    was = int(conn.execute("PRAGMA secure_delete").fetchone()[0])
    conn.execute("PRAGMA secure_delete=ON")  # what an erasure frees is overwritten with zeros
    try:
        if isinstance(job, Erase):
            done = erasure.erase_batch(conn, job.ids, job.cause, job.reason, None, job.now, key)
            return (0, False) if done is None else (done.entries, done.indexed)
        return purge.run_step(conn, job, merge_pages=64)
    finally:
        conn.execute(f"PRAGMA secure_delete={was}")


def _age_seconds(iso: str) -> float:
    try:
        return time.time() - clock.seconds(iso)
    except ValueError:
        return math.inf
