"""What the writer does beside the groups it commits: the full-text indexes, and the WAL's checkpoints.

Neither is on the path of an answer. :class:`SearchIndexer` feeds the full-text indexes
(:mod:`topic_audit.log.search`) in small batches between groups, on the writer's connection, when no request
waits for it. :class:`WalCheckpointer` copies the WAL into the database file from a thread and a
connection of its own, beside the writer.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

from topic_audit.log import search
from topic_audit.log.database import TOOL_TIMEOUT_SECONDS, connect

log = logging.getLogger("topic_audit.housekeeping")

SEARCH_INDEX_SECONDS = 0.02
"""The full-text indexes are fed in small batches (:data:`topic_audit.log.search.BATCH`) between groups: one
at most this often, and only when no request is waiting for the writer, so that no answer waits behind
one; see :data:`SEARCH_INDEX_LATEST`."""

SEARCH_INDEX_LATEST = 0.2
"""Under a load that never leaves the writer's queue empty, a batch is indexed at least this often anyway
(the indexes may then fall behind, and catch up as soon as the load eases)."""

IDLE_SECONDS = 1.0
"""With nothing queued for this long, the writer looks for entries to index (other processes' too)."""

STOP_INDEXING_SECONDS = 2.0
"""On stop, the writer indexes what is left for up to this long (the rest waits for the next start)."""

CATCH_UP_SECONDS = 0.002
"""While the indexes are behind, the writer indexes another batch once nothing has been queued for this
long (and :data:`SEARCH_INDEX_SECONDS` have passed since the last)."""

CHECKPOINT_SECONDS = 0.25
"""How often the WAL is copied into the database file beside the writer (without a replica)."""


class SearchIndexer:
    """When the writer indexes a batch: told of each group and each idle wait, on the writer's thread.

    ``paused`` (a fault episode: the last write failed) skips indexing, so that a failing disk or a held
    lock costs no extra busy-timeout stalls.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._indexed_at = 0.0
        self._behind = True  # the indexes may lack entries
        try:
            search.merge_by_hand(conn)  # no batch merges a whole level inline (search.MERGE_PAGES)
        except sqlite3.Error as exc:  # derived data: FTS5 merges on its own meanwhile
            log.warning("the full-text indexes merge on their own for now: %s", exc)

    def wait_seconds(self) -> float:
        """How long the writer may wait for its queue before it should index (:meth:`idle`)."""
        if not self._behind:
            return IDLE_SECONDS
        return max(self._indexed_at + SEARCH_INDEX_SECONDS - time.monotonic(), CATCH_UP_SECONDS)

    def idle(self, paused: bool) -> None:
        """Nothing was queued for :meth:`wait_seconds`: a good moment to catch up."""
        self._behind = self._index(paused)

    def after_group(self, queue_empty: bool, paused: bool) -> None:
        """A group was committed (its answers are on their way): now and then, a small batch."""
        self._behind = True
        since = time.monotonic() - self._indexed_at
        if since >= SEARCH_INDEX_LATEST or (since >= SEARCH_INDEX_SECONDS and queue_empty):
            self._behind = self._index(paused)

    def finish(self, paused: bool) -> None:
        """On stop: leave the indexes current, within :data:`STOP_INDEXING_SECONDS`."""
        deadline = time.monotonic() + STOP_INDEXING_SECONDS
        while time.monotonic() < deadline and self._index(paused):
            pass

    def _index(self, paused: bool) -> bool:
        """Index one batch; whether there may be more to index."""
        self._indexed_at = time.monotonic()
        if paused:
            return False
        try:
            return search.index_new_entries(self.conn) > 0
        except sqlite3.Error as exc:  # derived data: retried on the next round
            log.debug("search indexing deferred: %s", exc)
            return False


class WalCheckpointer:
    """Copies the WAL into the database file from a connection of its own, beside the writer.

    SQLite checkpoints when a commit leaves the WAL past 1,000 pages, inside that COMMIT: the group's
    answers then waited for ~4 MB to be copied and the database file synced. A PASSIVE checkpoint
    here does that work while the writer goes on committing; the writer's own checkpoints then only
    find the last few pages left, and the WAL still restarts from its beginning as before.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        while not self._stopping.wait(CHECKPOINT_SECONDS):
            try:
                conn = conn or connect(self.path, timeout=TOOL_TIMEOUT_SECONDS)
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:  # the next round tries again; the writer's own still run
                log.debug("background checkpoint deferred: %s", exc)
        if conn is not None:
            conn.close()
