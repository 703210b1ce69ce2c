"""Leaving no copy of erased values in the database files, after an erasure has committed.

SQLite keeps deleted data in three places: FTS5 (3.40 has no ``secure-delete``) keeps deleted terms in
its index segments until they are merged away, so both full-text indexes are merged into one segment
(see :func:`merge_step` for the one form of that which stays safe, and :mod:`topic_audit.log.reindex` for
the rebuild that keeps it safe);
freed pages keep their old bytes unless ``secure_delete`` zeroed them (and pages freed earlier, by
connections that did not, are zeroed by :func:`wipe_step`); and the WAL still holds the pages as they
were before, until it is checkpointed into the database and truncated.

``serve`` runs the same steps one at a time as jobs of its writer (:mod:`topic_audit.writer.retention`).
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from topic_audit.log import reindex
from topic_audit.log.database import exists, transaction
from topic_audit.log.reindex import MOST_LEVELS, levels

INDEXES: Final = ("audit_log_fts", "topics_fts")
MERGE_STEPS: Final = 2000
"""Most merge steps of one index in one purge: each step is a short transaction, and under a steady
load new segments keep arriving, so the loop is bounded."""
WIPE_PAGES: Final = 2000
"""Free pages one step of :func:`wipe_step` overwrites (8 MB of zeros, about 60 ms here)."""
STEP_PAUSE: Final = 0.005
"""After a step that is not done yet: a writer waiting for the lock (``serve``'s) gets it."""
TRUNCATE_ATTEMPTS: Final = 200
TRUNCATE_PAUSE: Final = 0.05
"""Between two attempts to truncate the WAL (a reader -- Litestream -- may hold it for a while)."""


@dataclass(frozen=True, slots=True)
class Step:
    """One step of purging what SQLite keeps of erased values: ``wipe`` (free pages, a step of
    :func:`wipe_step`), ``reindex`` (of ``table``, when its structure grew too long:
    :func:`topic_audit.log.reindex.step`), ``merge`` (of ``table``), ``truncate`` (the WAL). ``serve``
    runs each as a job of its writer (:class:`topic_audit.writer.jobs.Purge`)."""

    step: str
    table: str = ""
    start: bool = True
    """``reindex``: whether a rebuild may start (one under way is finished in any case)."""
    most_levels: int = MOST_LEVELS
    """``reindex``: the levels of the index's structure from which a rebuild starts."""


Plan = Generator[Step, bool, bool]


def purge(
    conn: sqlite3.Connection, merge: bool = True, attempts: int = 200, most_levels: int = MOST_LEVELS
) -> bool:
    """Leave no copy of erased values in the database files: merge the full-text indexes into one segment
    each (deleted terms go with the merged-away segments; first rebuilt, if their structure lists
    ``most_levels`` levels, see :mod:`topic_audit.log.reindex`), zero freed pages, and checkpoint the WAL into
    the database, then truncate it. Returns False when a step could not finish (the merge did not settle
    within :data:`MERGE_STEPS` steps while others write, or a reader -- Litestream -- kept the WAL): the
    caller says so instead of promising that no copy remains."""
    conn.execute("PRAGMA secure_delete=ON")
    steps = plan(merge, most_levels, attempts)
    try:
        step = next(steps)
        while True:
            done = run_step(conn, step)
            if not done:
                time.sleep(pause_after(step))
            step = steps.send(done)
    except StopIteration as finished:
        return bool(finished.value)


def plan(merge: bool, most_levels: int = MOST_LEVELS, attempts: int = TRUNCATE_ATTEMPTS) -> Plan:
    """The steps of a purge, in order, each a short transaction (a :class:`Step`,
    which ``serve`` runs as a job of its writer): each is sent whether it is done, and the plan returns
    whether the purge completed. :func:`purge` runs it here; ``serve``'s retention on its writer
    (:meth:`topic_audit.writer.retention.OnTheWriter.purge`).

    Free pages are zeroed first and last (what the merges and the rebuilds freed too). An index is
    merged when asked (``merge``: the erased entries were indexed), and a rebuild of it under way
    (:mod:`topic_audit.log.reindex`) is finished -- then merged -- even when not."""
    complete = True
    while not (yield Step("wipe")):
        pass
    for table in INDEXES:
        rebuilt = False
        while not (yield Step("reindex", table, start=merge, most_levels=most_levels)):
            rebuilt = True
        if merge or rebuilt:
            for _ in range(MERGE_STEPS):  # bounded: under load new segments keep arriving
                if (yield Step("merge", table)):
                    break
            else:
                complete = False
    while not (yield Step("wipe")):
        pass
    for _ in range(attempts):
        if (yield Step("truncate")):
            return complete
    return False


def run_step(conn: sqlite3.Connection, step: Step, merge_pages: int = 500) -> bool:
    """Run one step of :func:`plan` on ``conn`` (``secure_delete`` on: the caller's)."""
    if step.step == "wipe":
        return wipe_step(conn)
    if step.step == "reindex":
        return reindex.step(conn, step.table, step.most_levels, start=step.start)
    if step.step == "merge":
        return merge_step(conn, step.table, merge_pages)
    return truncate_wal(conn)


def pause_after(step: Step) -> float:
    """How long to wait after ``step`` when it is not done yet."""
    return TRUNCATE_PAUSE if step.step == "truncate" else STEP_PAUSE


def merge_step(
    conn: sqlite3.Connection, table: str, pages: int = 500, most_levels: int = MOST_LEVELS
) -> bool:
    """One step of merging ``table`` into a single segment (one short transaction); True once done.

    FTS5 in SQLite 3.40 adds an empty level to an index's structure each time ``'merge', -N`` or
    ``'optimize'`` merges segments of different levels, and never removes one (later versions cap
    them): past 2,000 levels -- about a thousand purges, at a level or two each -- every statement on
    the index fails with "database disk image is malformed". Positive merges add none, but
    leave a segment per level, so deleted terms may stay. So a step merges with ``-pages`` while the
    structure lists fewer than ``most_levels`` levels. Purging rebuilds an index that reached them
    beside the one in use first (:func:`topic_audit.log.reindex.step`); should a step still find that many,
    it rebuilds the index in place (``'rebuild'``: one long transaction, but a sound index)."""
    with transaction(conn):
        if levels(conn, table) >= most_levels:
            conn.execute(f"INSERT INTO {table} ({table}) VALUES ('rebuild')")
            return True
        before = conn.total_changes
        conn.execute(f"INSERT INTO {table} ({table}, rank) VALUES ('merge', ?)", (-pages,))
        return conn.total_changes - before < 2


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


def wipe_step(conn: sqlite3.Connection, pages: int = WIPE_PAGES) -> bool:
    """One step (one short transaction) of overwriting the pages on the freelist with zeros: pages freed
    before erasure (by connections that did not zero what they freed) may still hold copies of erased
    values. Up to ``pages`` free pages are taken by a scratch table of zero blobs a step, until it holds
    as many as were free when the wipe began (its row 0 says how many: others may free pages meanwhile,
    so "none left" need never come) or none is left; then the table is emptied, ``pages`` at a time
    (``secure_delete`` zeroes them again as they are freed: the end of a blob's last page is not
    written by the blob), and dropped; then the step returns True."""
    page = int(conn.execute("PRAGMA page_size").fetchone()[0])
    blobs = max(1, pages // 8)
    with transaction(conn):
        if exists(conn, "erasure_scratch_full"):
            cursor = conn.execute(
                "DELETE FROM erasure_scratch_full WHERE rowid IN "
                "(SELECT rowid FROM erasure_scratch_full LIMIT ?)",
                (blobs,),
            )
            if cursor.rowcount:
                return False
            conn.execute("DROP TABLE erasure_scratch_full")
            return True
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        if not exists(conn, "erasure_scratch"):
            if not free:
                return True
            conn.execute("CREATE TABLE erasure_scratch (b BLOB)")
            conn.execute("INSERT INTO erasure_scratch (rowid, b) VALUES (0, ?)", (free,))
        target, taken = conn.execute(
            "SELECT max(CASE rowid WHEN 0 THEN b END), 8 * (count(*) - 1) FROM erasure_scratch"
        ).fetchone()
        if free and taken < target:
            conn.executemany(
                "INSERT INTO erasure_scratch (b) VALUES (zeroblob(?))",
                [(page * 8,)] * max(1, min(free, pages, target - taken) // 8),
            )
            return False
        conn.execute("ALTER TABLE erasure_scratch RENAME TO erasure_scratch_full")
        return False


LITESTREAM_WAIT_SECONDS: Final = 60.0
"""How long ``erase`` waits for Litestream to delete its local copies written before the purge (it
deletes them once compacted into the replica: ``l0-retention`` in :func:`topic_audit.offbox.replica.config`)."""


def litestream_folder(db: Path) -> Path:
    """Where Litestream keeps its local copies of the database's changes (LTX files of whole pages)."""
    return db.with_name(f".{db.name}-litestream")


def _older_files(folder: Path, before: float) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        try:
            if path.is_file() and path.stat().st_mtime <= before:
                found.append(path)
        except FileNotFoundError:  # deleted by Litestream meanwhile
            continue
    return found


def copies_left(db: Path, truncated: bool, before: float, wait: float = LITESTREAM_WAIT_SECONDS) -> list[str]:
    """What may still hold a copy of values erased before ``before`` (a time.time()), once a purge ran:
    each place named, with why. Empty: the database, its WAL and Litestream's local folder hold none.

    - ``truncated`` is what the purge said: False when a reader kept the WAL from being truncated.
      Litestream always holds one while it replicates, so with ``serve`` replicating the WAL keeps its
      older frames until the log outgrows them or ``serve`` stops.
    - Litestream's local folder holds page images of every recent transaction. While Litestream runs it
      deletes those written before the purge within about half a minute (waited for, up to ``wait``
      seconds). When the WAL could be truncated no reader holds it, so Litestream is not running: its
      folder is removed (it holds only copies of what the database holds, and Litestream rebuilds it at
      its next start)."""
    left = []
    if not truncated:
        left.append(
            f"{db.name}-wal: a reader held the WAL (Litestream holds it open while serve replicates), so its "
            "older frames were not truncated (or the full-text indexes did not settle)"
        )
    folder = litestream_folder(db)
    if truncated and folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
    deadline = time.monotonic() + wait
    while folder.is_dir() and (older := _older_files(folder, before)) and time.monotonic() < deadline:
        time.sleep(1.0)
    if folder.is_dir() and (older := _older_files(folder, before)):
        left.append(
            f"{folder.name}/: Litestream's local folder still holds {len(older)} files written before the "
            "purge (Litestream deletes them once they are in the replica, while serve runs)"
        )
    return left


def connect(path: Any) -> sqlite3.Connection:
    """A write connection for erasing: freed space and pages are overwritten with zeros."""
    from topic_audit.log.database import connect as write_connection

    conn = write_connection(path)
    conn.execute("PRAGMA secure_delete=ON")
    return conn
