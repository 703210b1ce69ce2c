"""Rebuilding a full-text index beside the one in use, in short steps, and swapping it in.

FTS5 in SQLite 3.40 grows an index's structure by a level with most merges that purging does, and
reports the index corrupt past 2,000 levels (:func:`topic_audit.privacy.purge.merge_step`); only a rebuild
gives it a fresh structure. ``'rebuild'`` in place is one transaction over the whole index -- 7 s for
``audit_log_fts`` on a 1,000,000-entry log, 2 s for ``topics_fts`` with 280,000 topics -- during which
``serve``'s writer commits nothing and so answers nothing. Instead, each :func:`step` is one short
transaction:

1. ``<index>_next`` is created with the index's own definition;
2. it is filled from the index in rowid order, :data:`ROWS` documents a step, up to what the index in
   use holds (an external-content index reads its content table; ``topics_fts`` its own copy);
3. once it has caught up, two renames swap it in (``<index>`` becomes ``<index>_old``);
4. the old index's tables are emptied :data:`ROWS` rows a step -- with ``secure_delete`` their pages are
   overwritten with zeros, the terms of erased values with them -- and the old index is dropped.

While a rebuild is under way, whatever changes documents of the index in use changes the ones the next
index already copied too: every writer of an index writes through :func:`copies`.

SQLite 3.44 and later cap the levels and have FTS5's ``secure-delete`` option (deleted terms leave the
index at once): on such a platform neither the merges of :func:`topic_audit.privacy.purge.purge` nor this
rebuild would be needed.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Final

from topic_audit.log.database import exists, transaction

ROWS: Final = 1000
"""Documents copied, or rows of the old index deleted, in one step (about 15 ms here)."""
MOST_LEVELS: Final = 1000
"""Levels an index's structure may list before purging rebuilds it (SQLite 3.40 fails past 2,000)."""
EVERYTHING: Final = 1 << 62
SETTINGS: Final = ("pgsz", "hashsize", "usermerge", "crisismerge", "rank")
"""The settings of an index the next one is created with (those SQLite 3.40 knows: one a newer SQLite
wrote would be refused, and every purge with it). ``automerge`` is set only as the next index is swapped
in: the writer merges by hand (:func:`topic_audit.log.search.merge_by_hand`) only the indexes in use, so
the next one merges on its own while it fills -- with its merging off, FTS5's crisis merge would merge a
whole level inside one step."""
_SHADOWS: Final = {
    "data": ("rowid", "rowid > 10"),
    "idx": ("segid, term", "1"),
    "content": ("rowid", "1"),
    "docsize": ("rowid", "1"),
}
"""The tables of an FTS5 index, each with its key (``_idx`` has no rowid) and the rows to delete: the
averages and the structure (rows 1 and 10 of ``_data``, no text in them) stay until the drop, which
cannot open the index without them."""


def copies(conn: sqlite3.Connection, index: str) -> list[tuple[str, int]]:
    """The tables holding documents of ``index``, each with the largest rowid a change must reach in it:
    the index itself (every rowid), and the next index while a rebuild fills it (the rowids it copied)."""
    found = [(index, EVERYTHING)]
    if exists(conn, f"{index}_next"):
        found.append((f"{index}_next", _highest(conn, f"{index}_next")))
    return found


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


def step(
    conn: sqlite3.Connection,
    index: str,
    most_levels: int = MOST_LEVELS,
    rows: int = ROWS,
    start: bool = True,
) -> bool:
    """One step of rebuilding ``index`` (one short transaction on ``conn``, autocommit): started (if
    ``start``) when its structure lists ``most_levels`` levels or more, and carried on, whatever
    ``start`` says, while one is under way -- an unfinished rebuild's tables may hold erased terms. True
    when no rebuild is (any longer) under way: the caller calls again until then."""
    with transaction(conn):
        if exists(conn, f"{index}_old"):
            return _empty_old(conn, f"{index}_old", rows)
        if not exists(conn, f"{index}_next"):
            if not start or levels(conn, index) < most_levels:
                return True
            _create_next(conn, index)
            return False
        if _copy(conn, index, rows) < rows:  # caught up: in the same transaction, swap
            conn.execute(f"ALTER TABLE {index} RENAME TO {index}_old")
            conn.execute(f"ALTER TABLE {index}_next RENAME TO {index}")
            _set(conn, index, f"{index}_old", ("automerge",))
        return False


def abandon(conn: sqlite3.Connection, index: str) -> None:
    """Drop the next index of a rebuild under way (before ``index`` is rewritten as a whole), in the
    caller's transaction, its pages overwritten with zeros; a later purge starts again (and empties an
    old index left by a swap, a step at a time)."""
    if exists(conn, f"{index}_next"):
        was = int(conn.execute("PRAGMA secure_delete").fetchone()[0])
        conn.execute("PRAGMA secure_delete=ON")
        try:
            conn.execute(f"DROP TABLE {index}_next")
        finally:
            conn.execute(f"PRAGMA secure_delete={was}")


def _highest(conn: sqlite3.Connection, index: str) -> int:
    return int(conn.execute(f"SELECT coalesce(max(id), 0) FROM {index}_docsize").fetchone()[0])


def _create_next(conn: sqlite3.Connection, index: str) -> None:
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (index,)).fetchone()[0]
    created = re.sub(
        rf"^CREATE VIRTUAL TABLE\s+\"?{index}\"?", f"CREATE VIRTUAL TABLE {index}_next", sql, flags=re.I
    )
    if created == sql:
        raise ValueError(f"{index} is not a full-text index defined as expected: {sql}")
    conn.execute(created)
    _set(conn, f"{index}_next", index, SETTINGS)


def _set(conn: sqlite3.Connection, index: str, source: str, keys: tuple[str, ...]) -> None:
    """Give ``index`` the settings among ``keys`` that the index ``source`` has (FTS5 keeps them in the
    index, not in its definition)."""
    marks = ", ".join("?" * len(keys))
    for key, value in conn.execute(f"SELECT k, v FROM {source}_config WHERE k IN ({marks})", keys).fetchall():
        conn.execute(f"INSERT INTO {index} ({index}, rank) VALUES (?, ?)", (key, value))


def _copy(conn: sqlite3.Connection, index: str, rows: int) -> int:
    """Copy up to ``rows`` documents of ``index`` the next index lacks, in rowid order; how many."""
    columns = ", ".join(f'"{name}"' for _, name, *_ in conn.execute(f"PRAGMA table_info({index})").fetchall())
    cursor = conn.execute(
        f"INSERT INTO {index}_next (rowid, {columns}) SELECT rowid, {columns} FROM {index} "
        "WHERE rowid > ? AND rowid <= ? ORDER BY rowid LIMIT ?",
        (_highest(conn, f"{index}_next"), _highest(conn, index), rows),
    )
    return int(cursor.rowcount)


def _empty_old(conn: sqlite3.Connection, old: str, rows: int) -> bool:
    """Delete up to ``rows`` rows of the old index's tables; once they are empty, drop it (True)."""
    for shadow, (key, which) in _SHADOWS.items():
        table = f"{old}_{shadow}"
        if not exists(conn, table):
            continue
        cursor = conn.execute(
            f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE {which} LIMIT ?)",
            (rows,),
        )
        if cursor.rowcount:
            return False
    conn.execute(f"DROP TABLE {old}")
    return True
