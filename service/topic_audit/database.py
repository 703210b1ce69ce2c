"""The write connection and its transactions: how every writer of the database opens it and commits.

A write connection is in autocommit mode (``isolation_level=None``): nothing is in a transaction unless
it says so, with :func:`transaction`. The database is in WAL mode with ``synchronous=FULL``, so a
COMMIT returns only once the transaction is on the disk; a commit waits at most
:data:`BUSY_TIMEOUT_SECONDS` for another process's write lock.

Every write takes the write lock when it begins (``BEGIN IMMEDIATE``), not at its first write: what it
reads (the chain head, a topic, the last checkpoint) cannot change under it, so several processes on
one file still build one contiguous chain. A transaction that fails is rolled back, unless SQLite
already did (a full disk, an I/O error or a busy lock end the transaction by themselves; a ROLLBACK then
would replace the real error by "no transaction is active").
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, NamedTuple

from topic_audit import chain

BUSY_TIMEOUT_SECONDS = 1.0
"""How long a commit waits for another process's lock: well inside Tencent's 2 s timeout."""


def connect(path: Path, autocheckpoint: bool = True) -> sqlite3.Connection:
    """A write connection: autocommit mode (explicit transactions), WAL, ``synchronous=FULL``.

    Without ``autocheckpoint``, this connection never checkpoints the WAL: with an off-box replica,
    Litestream does (its guidance for busy writers), so that no checkpoint races its reading of the WAL.
    """
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_SECONDS)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    if not autocheckpoint:
        conn.execute("PRAGMA wal_autocheckpoint=0")
    return conn


@contextmanager
def transaction(
    conn: sqlite3.Connection, mode: Literal["IMMEDIATE", "DEFERRED"] = "IMMEDIATE"
) -> Iterator[sqlite3.Connection]:
    """One transaction on ``conn`` (autocommit mode): committed when the block ends, rolled back when it
    raises (the exception goes on).

    ``IMMEDIATE`` (every write) takes the write lock at once; ``DEFERRED`` is a read snapshot: what the
    block reads is one consistent state of the database, whatever is committed meanwhile.
    """
    conn.execute(f"BEGIN {mode}")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
            conn.execute("ROLLBACK")
        raise


class Durability(NamedTuple):
    """What a connection promises about a commit (compares equal to the plain tuple)."""

    synchronous: int
    """2 is FULL: a commit is synced before it returns."""
    wal_autocheckpoint: int
    """Pages after which a commit checkpoints the WAL; 0 when Litestream checkpoints instead."""
    journal_mode: str


def durability(conn: sqlite3.Connection) -> Durability:
    """The pragmas of ``conn`` that the writer's guarantees rest on."""
    return Durability(
        int(conn.execute("PRAGMA synchronous").fetchone()[0]),
        int(conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]),
        str(conn.execute("PRAGMA journal_mode").fetchone()[0]),
    )


def exists(conn: sqlite3.Connection, name: str) -> bool:
    """Whether the schema has a table, index, view or trigger called ``name``."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() is not None


def head(conn: sqlite3.Connection) -> tuple[int, str]:
    """The last log entry's id and entry hash, ``(0, chain.GENESIS)`` for an empty log; read it under
    the write lock to append after it."""
    found = conn.execute("SELECT id, entry_hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    return (0, chain.GENESIS) if found is None else (found[0], found[1])
