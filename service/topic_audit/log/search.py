"""The full-text indexes (``audit_log_fts``, ``topics_fts``), fed behind the writer rather than by triggers.

Indexing a request body costs more than appending it, and FTS5 statements inside every group's commit
were a large share of the writer's time. The writer instead brings both indexes up to date in small
batches several times a second (and whenever it is idle), between groups, off the path of any answer:
each batch holds the write lock for a millisecond or two. Under a load that never leaves the writer
idle they fall behind (a batch at least every 0.2 s) and catch up once it eases. The indexes are
derived data: they are committed without waiting for the disk (``synchronous=NORMAL``) and, after a
power loss, simply pick up from where their last durable batch ended.

``audit_log_fts`` is external-content (it indexes ``audit_log`` rows in place) and remembers where it is
by its own largest rowid. ``topics_fts`` keeps its own copy of the texts it indexed, so that a topic
indexed again is first removed by rowid; ``search_progress`` holds the last log entry whose topic it
has indexed (every change to a topic's texts is an entry naming that topic in ``topic_id``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from topic_audit.log import database, reindex

BATCH = 64
"""Most log entries indexed in one transaction, so that the write lock is never held for long (about
1.5 ms here, the topics they changed included)."""

INDEXES = ("audit_log_fts", "topics_fts")
MERGE_PAGES = 16
"""Pages of merging each index gets after a batch that added to it. FTS5's own merging (``automerge``,
which :func:`merge_by_hand` turns off) merged a level's segments whole inside the insert that filled
it, and a callback that arrived meanwhile waited for it. Catching up on 100,000 entries
(``python -m tests.benchmarks.bench_search``): FTS5's own, p99 6.1 ms a batch, the longest 25 ms, 7 over
10 ms; by hand, p99 3.1 ms, the longest 10 ms, none over; the index as compact (1,925 pages against
1,901). The structure grows by a level now and then, as with FTS5's own merging (5 levels after 3,000
batches, against 6); a positive ``'merge'`` leaves no empty ones (see
:func:`topic_audit.privacy.purge.merge_step`)."""

_TOPICS_OF = (
    "SELECT rowid FROM topics WHERE topic_id IN "
    "(SELECT topic_id FROM audit_log WHERE id > ? AND id <= ? AND topic_id IS NOT NULL)"
)


def index_new_entries(conn: sqlite3.Connection, limit: int = BATCH) -> int:
    """Index up to ``limit`` log entries not yet in ``audit_log_fts``, and the topics that up to ``limit``
    entries not yet in ``topics_fts`` changed; returns how many log entries were taken. ``conn`` is
    autocommit."""
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        with database.transaction(conn):
            last = conn.execute("SELECT coalesce(max(id), 0) FROM audit_log_fts_docsize").fetchone()[0]
            cursor = conn.execute(
                "INSERT INTO audit_log_fts (rowid, request_body, detail) "
                "SELECT id, request_body, detail FROM audit_log WHERE id > ? ORDER BY id LIMIT ?",
                (last, limit),
            )
            indexed, topics = int(cursor.rowcount), index_topics(conn, limit)
            for table, added in zip(INDEXES, (indexed, topics), strict=True):
                if added > 0:
                    conn.execute(f"INSERT INTO {table} ({table}, rank) VALUES ('merge', ?)", (MERGE_PAGES,))
            taken = max(indexed, topics)
    finally:
        conn.execute("PRAGMA synchronous=FULL")
    return taken


def merge_by_hand(conn: sqlite3.Connection) -> None:
    """Turn FTS5's own merging off for both indexes (a setting stored in each index; the writer sets it as
    it starts): :func:`index_new_entries` merges a few pages after each batch instead (:data:`MERGE_PAGES`)."""
    with database.transaction(conn):
        for table in INDEXES:
            conn.execute(f"INSERT INTO {table} ({table}, rank) VALUES ('automerge', 0)")


def index_topics(conn: sqlite3.Connection, limit: int | None = None) -> int:
    """Index the topics changed by up to ``limit`` (default: all) log entries not yet in ``topics_fts``, in
    the caller's transaction; returns how many entries that was."""
    found = conn.execute("SELECT last_entry_id FROM search_progress WHERE name = 'topics_fts'").fetchone()
    if found is None:  # a database migrated before topics_fts moved behind the writer
        return 0
    since = int(found[0])
    upto = min(
        since + (limit or 1 << 62),
        int(conn.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()[0]),
    )
    if upto <= since:
        return 0
    retext_topics(conn, f"rowid IN ({_TOPICS_OF})", (since, upto))
    conn.execute("UPDATE search_progress SET last_entry_id = ? WHERE name = 'topics_fts'", (upto,))
    return upto - since


def retext_topics(conn: sqlite3.Connection, where: str, params: Sequence[object] = ()) -> None:
    """Index again, in the caller's transaction, the topics ``SELECT rowid FROM topics WHERE <where>``
    selects (a topic no longer in ``topics`` goes), in ``topics_fts`` and, while a rebuild fills it, in
    the next index (:func:`topic_audit.log.reindex.copies`)."""
    for table, upto in reindex.copies(conn, "topics_fts"):
        conn.execute(
            f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM topics WHERE {where}) AND rowid <= {upto}",
            params,
        )
        conn.execute(
            f"INSERT INTO {table} (rowid, name, introduction, notification) "
            f"SELECT rowid, name, introduction, notification FROM topics WHERE ({where}) AND rowid <= {upto}",
            params,
        )


def forget_missing_topics(conn: sqlite3.Connection) -> None:
    """Remove from the topic indexes the topics no longer in ``topics``, in the caller's transaction."""
    for table, _ in reindex.copies(conn, "topics_fts"):
        conn.execute(f"DELETE FROM {table} WHERE rowid NOT IN (SELECT rowid FROM topics)")


def reindex_topics(conn: sqlite3.Connection) -> None:
    """Index every topic afresh (after ``rebuild-projection`` rewrote the table), in the caller's
    transaction; a rebuild of the index under way is dropped (it copied what is gone)."""
    reindex.abandon(conn, "topics_fts")
    conn.execute("DELETE FROM topics_fts")
    conn.execute(
        "INSERT INTO topics_fts (rowid, name, introduction, notification) "
        "SELECT rowid, name, introduction, notification FROM topics"
    )
    conn.execute(
        "UPDATE search_progress SET last_entry_id = (SELECT coalesce(max(id), 0) FROM audit_log) "
        "WHERE name = 'topics_fts'"
    )


def index_everything(conn: sqlite3.Connection) -> int:
    total = 0
    while done := index_new_entries(conn, 10_000):
        total += done
    return total
