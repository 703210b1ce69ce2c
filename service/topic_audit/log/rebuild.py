"""``rebuild-projection``: set ``topics`` to a replay of the log, holding the write lock only briefly.

1. Each core replays a :class:`~topic_audit.log.projection.Partition` of the topics in a read snapshot of the
   database and compares it with the table in the same snapshot; only the topics that differ come back.
2. Under the write lock, the entries committed since the snapshots are replayed for those topics (the
   receiver kept every other topic right: it applies the same :func:`~topic_audit.log.projection.project` to a
   right row), the differences are written (the full-text index follows) and ``topic_counts`` is
   recounted, and all of it commits at once. Readers see the old table until then, never a half-built
   one; the receiver waits for this step only, not for the replay.

A log whose recorded topic ids disagree with its bodies (an altered log) cannot be partitioned by them,
and is replayed in one piece instead.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from topic_audit.log import database, projection, search
from topic_audit.log.database import read_only
from topic_audit.tencent import models

Progress = Callable[[int, int], None]
"""Called with (id reached, last id) while the log is replayed."""

PARALLEL_FROM = 50_000
"""Entries below which one process replays everything (starting processes would cost more)."""


@dataclass(frozen=True, slots=True)
class Rebuilt:
    topics: int
    """Topics in the table afterwards."""
    written: int
    """Rows inserted, updated or deleted: the topics that differed from the log."""
    locked: float = field(default=0.0, compare=False)
    """Seconds the write lock was held (what a running receiver waited at most)."""


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What the replay of one partition found, as of the last entry in its read snapshot."""

    high: int
    rows: dict[str, tuple[Any, ...] | None]
    """Each differing topic's replayed row (in table order; tuples cross processes far cheaper than
    dicts), or None when the log does not have it."""
    last_sha: dict[str, str | None]
    """For each differing topic: the body hash of the entry that last updated it (for redeliveries)."""


def rebuild(
    conn: sqlite3.Connection, progress: Progress | None = None, processes: int | None = None
) -> Rebuilt:
    """Rebuild ``topics`` (``conn`` in autocommit mode, on a database file) from the log."""
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    high = conn.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()[0]
    count = processes or os.cpu_count() or 1
    snapshots: list[_Snapshot] | None = None
    if count > 1 and high >= PARALLEL_FROM:
        parts = [projection.Partition(number, count) for number in range(count)]
        with contextlib.suppress(projection.Misrouted):  # then in one piece, below
            snapshots = _in_processes(path, parts, high, progress)
    if snapshots is None:
        snapshots = [_snapshot(path, None, _advance(progress, high))]
    with database.transaction(conn):
        locked = time.perf_counter()
        rows = _catch_up(conn, snapshots)
        written = _write(conn, rows)
        search.index_topics(conn)  # and the topics' full-text index in step with the table
    locked = time.perf_counter() - locked
    return Rebuilt(conn.execute("SELECT count(*) FROM topics").fetchone()[0], written, locked)


def _advance(progress: Progress | None, high: int) -> Callable[[int], None] | None:
    return None if progress is None else lambda reached: progress(reached, high)


def _snapshot(
    path: str, part: projection.Partition | None, progress: Callable[[int], None] | None
) -> _Snapshot:
    conn = read_only(path)
    try:
        with database.transaction(conn, "DEFERRED"):  # one snapshot for the replay and the comparison
            high = conn.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()[0]
            store, _, _ = projection.replay(conn, share=part, progress=progress)
            found = projection.differences(conn, store.rows, part)
    finally:
        conn.close()
    return _Snapshot(
        high,
        {d.topic_id: None if d.replayed is None else projection.row_values(d.replayed) for d in found},
        {d.topic_id: store.last_sha.get(d.topic_id) for d in found},
    )


_reached: Any = None
"""In a worker process: the shared array of ids reached, one per partition."""


def _start_worker(reached: Any) -> None:
    global _reached
    _reached = reached


def _replay_partition(path: str, part: projection.Partition) -> _Snapshot:
    def advance(entry_id: int) -> None:
        _reached[part.number] = entry_id

    return _snapshot(path, part, advance)


def _in_processes(
    path: str, parts: list[projection.Partition], high: int, progress: Progress | None
) -> list[_Snapshot]:
    context = multiprocessing.get_context("spawn")
    reached = context.Array("q", len(parts), lock=False)
    with ProcessPoolExecutor(
        len(parts), mp_context=context, initializer=_start_worker, initargs=(reached,)
    ) as pool:
        futures = [pool.submit(_replay_partition, path, part) for part in parts]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            if any(f.exception() for f in done):
                break
            if progress is not None:
                progress(min(reached), high)
        return [f.result() for f in futures]  # raises what a worker raised (Misrouted)


class _Since:
    """The entries after each partition's snapshot, for the topics that differed (a replay share)."""

    where, params = "1", ()

    def __init__(self, since: dict[str, int]) -> None:
        self.since = since
        """Topic -> the last entry its partition's snapshot held."""

    def share(
        self, event: models.TopicEvent, recorded_topic: str | None, entry_id: int
    ) -> models.TopicEvent | None:
        since = self.since
        return projection.only(
            event, [t for t in projection.topic_ids(event) if since.get(t, entry_id) < entry_id]
        )


class _Seeded(projection.MemoryStore):
    """The differing topics' replayed rows, each made a dict only if a later entry touches it."""

    def __init__(self, seed: dict[str, tuple[Any, ...] | None]) -> None:
        super().__init__()
        self.seed = seed

    def lookup(self, topic_id: str) -> tuple[projection.Topic | None, str | None]:
        if topic_id not in self.rows and (row := self.seed.get(topic_id)) is not None:
            self.rows[topic_id] = dict(zip(projection.COLUMNS, row, strict=True))
        return super().lookup(topic_id)

    def row(self, topic_id: str) -> tuple[Any, ...] | None:
        if topic_id in self.rows:
            return projection.row_values(self.rows[topic_id])  # type: ignore[no-any-return]
        return self.seed[topic_id]


def _catch_up(conn: sqlite3.Connection, snapshots: list[_Snapshot]) -> dict[str, tuple[Any, ...] | None]:
    """The replayed rows of the differing topics as of now (under the write lock): None to delete."""
    store = _Seeded({})
    since: dict[str, int] = {}
    for snapshot in snapshots:
        store.seed.update(snapshot.rows)
        store.last_sha.update(snapshot.last_sha)
        since.update(dict.fromkeys(snapshot.rows, snapshot.high))
    if since:
        projection.replay(conn, store, min(since.values()), share=_Since(since))
    return {topic_id: store.row(topic_id) for topic_id in sorted(since)}


BULK_FROM = 10_000
"""Rows written from which the table's indexes are dropped first and built again afterwards, and the
full-text index built afresh in one pass: building by sorting is several times faster than keeping them
up to date row by row. Below it, the written topics are indexed again one by one."""


def _write(conn: sqlite3.Connection, rows: dict[str, tuple[Any, ...] | None]) -> int:
    """Write the rows that differ and recount ``topic_counts``."""
    bulk = len(rows) >= BULK_FROM
    derived = conn.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = 'topics' AND sql IS NOT NULL "
        "AND type IN ('trigger', 'index')"
    ).fetchall()
    for kind, name, _ in derived if bulk else ():
        conn.execute(f'DROP {kind} "{name}"')
    conn.executemany(
        "DELETE FROM topics WHERE topic_id = ?", [(t,) for t, row in rows.items() if row is None]
    )
    conn.executemany(projection.UPSERT, [row for row in rows.values() if row is not None])
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'topic%'")}
    if bulk:
        for _, _, sql in derived:
            conn.execute(sql)
        search.reindex_topics(conn)
    else:  # the full-text index follows: deleted rows leave texts behind, kept and new rows are indexed again
        search.forget_missing_topics(conn)
        search.retext_topics(conn, "topic_id IN (SELECT value FROM json_each(?))", [json.dumps(list(rows))])
    if "topic_counts" in tables:
        counted = dict.fromkeys(("active", "deleted"), 0)
        for deleted, topics in conn.execute(
            "SELECT deleted_entry_id IS NOT NULL, count(*) FROM topics GROUP BY 1"
        ):
            counted["deleted" if deleted else "active"] = topics
        conn.executemany(
            "UPDATE topic_counts SET topics = ? WHERE state = ?", [(n, s) for s, n in counted.items()]
        )
    return len(rows)
