"""The RFC 9162 tree over ``audit_log``, stored as hash tiles so that a proof reads a few rows, not the log.

Leaf *n* (from 0) is the entry with id *n*+1; its leaf data is the 32 raw bytes of ``entry_hash``.
``tree_hashes`` (migration m013) holds, at each *level* ``L >= 1``, the hash of every complete subtree
of ``256**L`` leaves: row ``(L, i)`` is ``MTH(D[i * 256**L : (i + 1) * 256**L])`` -- hash ``i % 256``
of the C2SP tlog-tiles tile ``L/(i // 256)``. Level 0 (the leaf hashes) is not stored: it is computed
from ``audit_log.entry_hash``, one range of ids at a time. Rows are only ever added (by :func:`update`,
as each checkpoint is signed: :func:`topic_audit.writer.signer.checkpoint`), and every one can be recomputed from the log (``verify`` does).

A subtree of height ``h`` is then the fold of at most 128 hashes of one tile at level ``h // 8``, so an
inclusion proof reads one tile per level: four ranges of rows on a 5,000,000-entry log.
"""

from __future__ import annotations

import hashlib
import sqlite3
from typing import Final

from topic_audit.transparency import tlog

TILE_HEIGHT: Final = 8
"""Tiles are 2**8 = 256 hashes wide, as in C2SP tlog-tiles. Tests use smaller tiles to reach every level."""

CHUNK: Final = 1 << 16
"""Leaves read (and their level-1 hashes committed) per step of :func:`update`."""


def leaf_count(conn: sqlite3.Connection) -> int:
    """The log's size: ids are contiguous from 1 (the append-only trigger sees to it)."""
    return int(conn.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()[0])


def leaf_hashes(conn: sqlite3.Connection, start: int, end: int) -> list[bytes]:
    """Leaf hashes of leaves ``start`` to ``end - 1`` (entries ``start + 1`` to ``end``)."""
    rows = conn.execute(
        "SELECT entry_hash FROM audit_log WHERE id > ? AND id <= ? ORDER BY id", (start, end)
    ).fetchall()
    if len(rows) != end - start:
        raise LookupError(f"the log has no entries {start + 1}..{end}")
    sha256, fromhex = hashlib.sha256, bytes.fromhex
    try:
        return [sha256(b"\x00" + fromhex(h)).digest() for (h,) in rows]  # tlog.leaf_hash, inlined
    except (ValueError, TypeError):  # an entry_hash that is no hash (a tampered row): its bytes as they are
        return [tlog.leaf_hash(_leaf_data(h)) for (h,) in rows]


def _leaf_data(value: object) -> bytes:
    try:
        return bytes.fromhex(str(value)) if isinstance(value, str) else bytes(value)  # type: ignore[call-overload]
    except (ValueError, TypeError):
        return str(value).encode()


def stored_count(conn: sqlite3.Connection, level: int) -> int:
    row = conn.execute("SELECT max(idx) FROM tree_hashes WHERE level = ?", (level,)).fetchone()
    return 0 if row[0] is None else int(row[0]) + 1


def update(conn: sqlite3.Connection, size: int | None = None, tile_height: int = TILE_HEIGHT) -> int:
    """Store the hash of every complete tile-sized subtree of the first ``size`` leaves (default: the
    whole log) not stored yet, level by level, committing every :data:`CHUNK` leaves (``conn`` in
    autocommit mode, outside a transaction). Returns the number of hashes added."""
    size = leaf_count(conn) if size is None else size
    width = 1 << tile_height
    added, level, below = 0, 1, size
    while below >= width:
        have, target = stored_count(conn, level), below // width
        step = max(1, CHUNK // width)
        for first in range(have, target, step):
            last = min(first + step, target)
            if level == 1:
                hashes = leaf_hashes(conn, first * width, last * width)
            else:
                hashes = _stored(conn, level - 1, first * width, last * width)
            nodes = [tlog.fold(hashes[i : i + width]) for i in range(0, len(hashes), width)]
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT OR IGNORE INTO tree_hashes (level, idx, hash) VALUES (?, ?, ?)",
                    [(level, first + i, h) for i, h in enumerate(nodes)],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            added += len(nodes)
        level, below = level + 1, target
    return added


def _stored(conn: sqlite3.Connection, level: int, start: int, end: int) -> list[bytes]:
    rows = conn.execute(
        "SELECT hash FROM tree_hashes WHERE level = ? AND idx >= ? AND idx < ? ORDER BY idx",
        (level, start, end),
    ).fetchall()
    return [h for (h,) in rows]


class StoredTree:
    """:class:`tlog.HashReader` over the stored tiles and the log, for trees of at most ``size`` leaves.

    Reads whole tiles and keeps them for the reader's life (one proof or one receipt). A tile the
    checkpoint job has not stored yet is computed from the level below (correct, only slower)."""

    def __init__(self, conn: sqlite3.Connection, size: int, tile_height: int = TILE_HEIGHT) -> None:
        self.conn, self.size, self.tile_height = conn, size, tile_height
        self.tiles: dict[tuple[int, int], list[bytes]] = {}

    def subtree(self, height: int, index: int) -> bytes:
        if (index + 1) << height > self.size:
            raise ValueError(f"subtree {height}/{index} is not complete in a tree of size {self.size}")
        level, rest = divmod(height, self.tile_height)
        per_tile = 1 << (self.tile_height - rest)  # subtrees of this height in one tile
        tile = self.tile(level, index // per_tile)
        count = 1 << rest
        offset = (index % per_tile) * count
        return tlog.fold(tile[offset : offset + count])

    def tile(self, level: int, number: int) -> list[bytes]:
        """Hashes of tile ``level/number`` (as many as the tree of ``self.size`` leaves completes)."""
        key = (level, number)
        if key not in self.tiles:
            width = 1 << self.tile_height
            available = self.size >> (self.tile_height * level)
            start, end = number * width, min((number + 1) * width, available)
            if level == 0:
                hashes = leaf_hashes(self.conn, start, end)
            else:
                hashes = _stored(self.conn, level, start, end)
                if len(hashes) < end - start:  # not stored yet: from the level below
                    below = [self.tile(level - 1, t) for t in range(start, end)]
                    hashes = [tlog.fold(t) for t in below]
            self.tiles[key] = hashes
        return self.tiles[key]


def root(conn: sqlite3.Connection, size: int) -> bytes:
    return tlog.root(StoredTree(conn, size), size)
