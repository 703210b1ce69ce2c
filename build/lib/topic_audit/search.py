"""The full-text index of ``audit_log``, fed behind the writer rather than by a trigger.

Indexing a request body costs more than appending it; done per row inside the commit it roughly doubled
the writer's cost. The writer instead indexes new entries in bounded batches about once a second (and
whenever it is idle), off the path of any answer. The index is derived data: it is committed without
waiting for the disk (``synchronous=NORMAL``) and, after a power loss, simply picks up from where its
last durable batch ended.
"""

from __future__ import annotations

import sqlite3

BATCH = 1000
"""Most entries indexed in one transaction, so that a backlog never holds the write lock for long."""


def index_new_entries(conn: sqlite3.Connection, limit: int = BATCH) -> int:
    """Index up to ``limit`` entries not yet in ``audit_log_fts``; returns how many. ``conn`` is autocommit."""
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            last = conn.execute("SELECT coalesce(max(id), 0) FROM audit_log_fts_docsize").fetchone()[0]
            cursor = conn.execute(
                "INSERT INTO audit_log_fts (rowid, request_body, detail) "
                "SELECT id, request_body, detail FROM audit_log WHERE id > ? ORDER BY id LIMIT ?",
                (last, limit),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.execute("PRAGMA synchronous=FULL")
    return int(cursor.rowcount)


def index_everything(conn: sqlite3.Connection) -> int:
    total = 0
    while done := index_new_entries(conn):
        total += done
    return total
