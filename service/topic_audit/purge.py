"""Leaving no copy of erased values in the database files, after an erasure has committed.

SQLite keeps deleted data in three places: FTS5 (3.40 has no ``secure-delete``) keeps deleted terms in
its index segments until they are merged away, so both full-text indexes are merged into one segment
(see :func:`merge_step` for the one form of that which stays safe);
freed pages keep their old bytes unless ``secure_delete`` zeroed them (and pages freed earlier, by
connections that did not, are zeroed by :func:`wipe_freelist`); and the WAL still holds the pages as they
were before, until it is checkpointed into the database and truncated.

``serve`` runs the same steps one at a time as jobs of its writer (:mod:`topic_audit.retention`).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any, Final

from topic_audit.database import transaction

INDEXES: Final = ("audit_log_fts", "topics_fts")
MERGE_STEPS: Final = 2000
"""Most merge steps of one index in one purge: each step is a short transaction, and under a steady
load new segments keep arriving, so the loop is bounded."""
MOST_LEVELS: Final = 1000
"""Levels an index's structure may list before a merge step rebuilds it instead (see :func:`merge_step`).
SQLite 3.40 reports the index corrupt ("database disk image is malformed") past 2,000."""


def purge(
    conn: sqlite3.Connection, merge: bool = True, attempts: int = 200, most_levels: int = MOST_LEVELS
) -> bool:
    """Leave no copy of erased values in the database files: merge the full-text indexes into one segment
    each (deleted terms go with the merged-away segments), zero freed pages, and checkpoint the WAL into
    the database, then truncate it. Returns False when a step could not finish (the merge did not settle
    within :data:`MERGE_STEPS` steps while others write, or a reader -- Litestream -- kept the WAL): the
    caller says so instead of promising that no copy remains."""
    conn.execute("PRAGMA secure_delete=ON")
    complete = True
    for table in INDEXES if merge else ():
        steps = (merge_step(conn, table, most_levels=most_levels) for _ in range(MERGE_STEPS))
        complete = any(steps) and complete
    wipe_freelist(conn)  # last: what the merges freed too
    for _ in range(attempts):
        if truncate_wal(conn):
            return complete
        time.sleep(0.05)
    return False


def merge_step(
    conn: sqlite3.Connection, table: str, pages: int = 500, most_levels: int = MOST_LEVELS
) -> bool:
    """One step of merging ``table`` into a single segment (one short transaction); True once done.

    FTS5 in SQLite 3.40 adds an empty level to an index's structure each time ``'merge', -N`` or
    ``'optimize'`` merges segments of different levels, and never removes one (later versions cap
    them): past 2,000 levels -- about a thousand purges, at a level or two each -- every statement on
    the index fails with "database disk image is malformed". Positive merges add none, but
    leave a segment per level, so deleted terms may stay. So a step merges with ``-pages`` while the
    structure lists fewer than ``most_levels`` levels, and otherwise rebuilds the index from its content
    (``'rebuild'``: one transaction over the whole index, a fresh structure, and no deleted term left)."""
    with transaction(conn):
        if levels(conn, table) >= most_levels:
            conn.execute(f"INSERT INTO {table} ({table}) VALUES ('rebuild')")
            return True
        before = conn.total_changes
        conn.execute(f"INSERT INTO {table} ({table}, rank) VALUES ('merge', ?)", (-pages,))
        return conn.total_changes - before < 2


def levels(conn: sqlite3.Connection, table: str) -> int:
    """How many levels the structure of the FTS5 index ``table`` lists: its structure record (row 10 of
    ``<table>_data``) is a 4-byte cookie, then the number of levels as an SQLite varint."""
    row = conn.execute(f"SELECT block FROM {table}_data WHERE id = 10").fetchone()
    if row is None or len(row[0]) < 5:
        return 0
    value, record = 0, bytes(row[0])
    for index, byte in enumerate(record[4:13]):
        if index == 8:
            return (value << 8) | byte
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            break
    return value


def truncate_wal(conn: sqlite3.Connection) -> bool:
    """Checkpoint the whole WAL into the database and truncate it; False while a reader holds an older
    snapshot (try again).

    Without waiting: a TRUNCATE checkpoint holds the write lock while its busy handler waits for readers
    (Litestream always holds one), so every writer would wait with it; the caller retries instead."""
    timeout = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
    conn.execute("PRAGMA busy_timeout=0")
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.execute(f"PRAGMA busy_timeout={timeout}")
    return not busy


def wipe_freelist(conn: sqlite3.Connection) -> None:
    """Overwrite every page on the freelist with zeros: pages freed before erasure (by connections that
    did not zero what they freed) may still hold copies of erased values. Fills the freelist with a
    scratch table of zero blobs, then drops it (with ``secure_delete`` its pages are zeroed again)."""
    page = int(conn.execute("PRAGMA page_size").fetchone()[0])
    with transaction(conn):
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        if not free:
            return
        conn.execute("CREATE TABLE erasure_scratch (b BLOB)")
        while free:
            conn.executemany(
                "INSERT INTO erasure_scratch VALUES (zeroblob(?))", [(page * 8,)] * (free // 8 + 1)
            )
            free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        conn.execute("DROP TABLE erasure_scratch")


def connect(path: Any) -> sqlite3.Connection:
    """A write connection for erasing: freed space and pages are overwritten with zeros."""
    from topic_audit.database import connect as write_connection

    conn = write_connection(path)
    conn.execute("PRAGMA secure_delete=ON")
    return conn
