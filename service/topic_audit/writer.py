"""The single writer: one thread owns the SQLite write connection and commits queued rows in groups.

Requests put their row on a queue and await a future. The writer thread takes whatever is queued (up to
``max_batch`` rows), and appends it in one transaction: for each row, in order, the projection change
and the chain link; then the rows, the changed topics and the hourly rollups in a few statements, and
one COMMIT (one fsync with ``synchronous=FULL``). Only then are the
futures resolved, so no answer is sent before its row is durable. A lone request commits at once; under
load the queue fills while a commit is in flight and the next transaction takes all of it (group commit).

Each transaction re-reads the chain head under ``BEGIN IMMEDIATE``, so writers in other processes on the
same file serialize on SQLite's lock and the chain stays contiguous. If a group fails, its rows are
retried one by one, so that a row that cannot be stored fails only its own request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from topic_audit import chain, models, outbox, projection, rollups, search

log = logging.getLogger(__name__)

SEARCH_INDEX_SECONDS = 0.02
"""The full-text indexes are fed in small batches (:data:`topic_audit.search.BATCH`) between groups: one
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

BUSY_TIMEOUT_SECONDS = 1.0
"""How long a commit waits for another process's lock: well inside Tencent's 2 s timeout."""


class AppendError(Exception):
    """The row could not be committed; the request must be answered 503."""


@dataclass(slots=True)
class Committed:
    id: int
    outcome: str
    duplicate_of: int | None
    entry_hash: str


class Observer(Protocol):
    """What the writer reports (implemented by :class:`topic_audit.metrics.Metrics`)."""

    def batch_committed(self, rows: list[dict[str, Any]], seconds: float, head_id: int) -> None: ...
    def batch_failed(self, count: int) -> None: ...
    def topics_counted(self, active: int, deleted: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Forward:
    """What forwarding records with a log row, in its transaction: the destinations to queue in the
    outbox (due ``delay`` seconds after receipt), and a Before-callback's attempt (its ``audit_id`` is
    filled in with the row's id)."""

    destinations: tuple[str, ...] = ()
    delay: float = 0.0
    before: outbox.Attempt | None = None


Item = tuple[dict[str, Any], models.TopicEvent | None, Forward | None]


@dataclass(slots=True)
class _Pending:
    row: dict[str, Any]
    event: models.TopicEvent | None
    forward: Forward | None
    future: asyncio.Future[Committed]
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True)
class _Record:
    """Delivery attempts to record in the next group's transaction (forwarding)."""

    attempts: list[outbox.Attempt]
    schedule: tuple[int, ...]
    future: asyncio.Future[list[outbox.Attempt]]
    loop: asyncio.AbstractEventLoop


_Queued = _Pending | _Record

_INSERT = (
    f"INSERT INTO audit_log ({', '.join(chain.COLUMNS)}) VALUES ({', '.join(':' + c for c in chain.COLUMNS)})"
)
_HEAD = "SELECT id, entry_hash FROM audit_log ORDER BY id DESC LIMIT 1"
_COUNT = (
    "UPDATE topic_counts SET topics = topics + CASE state WHEN 'active' THEN ? ELSE ? END "
    "RETURNING state, topics"
)
_STOP = object()


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


class AuditWriter:
    def __init__(
        self,
        path: Path,
        max_batch: int = 256,
        observer: Observer | None = None,
        index_search: bool = True,
        autocheckpoint: bool = True,
        checkpointer: bool | None = None,
    ) -> None:
        self.path = path
        self.autocheckpoint = autocheckpoint
        self.max_batch = max_batch
        self.observer = observer
        self.index_search = index_search
        """Keep the full-text index up to date between groups (the receiver's writer does; the delivery
        process's does not)."""
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._failed_rows = 0
        self._indexed_at = 0.0
        self.checkpointer = autocheckpoint if checkpointer is None else checkpointer and autocheckpoint
        """Copy the WAL into the database file from a thread beside the writer (:meth:`_checkpoint`);
        one per receiver is enough (the delivery process's writer does not)."""
        self._checkpointer: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._conn = connect(self.path, self.autocheckpoint)
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        if self.checkpointer:
            self._stopping.clear()
            self._checkpointer = threading.Thread(target=self._checkpoint, name="wal-checkpoint", daemon=True)
            self._checkpointer.start()

    def stop(self) -> None:
        """Commit what is queued, then close the connection."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None
        self._stopping.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
            self._checkpointer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- producers -------------------------------------------------------------------------------
    async def append(
        self, row: dict[str, Any], event: models.TopicEvent | None = None, forward: Forward | None = None
    ) -> Committed:
        """Queue ``row`` (every column but id and the chain) and wait until it is committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Committed] = loop.create_future()
        self._queue.put(_Pending(row, event, forward, future, loop))
        return await future

    async def record(self, attempts: list[outbox.Attempt], schedule: tuple[int, ...]) -> list[outbox.Attempt]:
        """Record delivery attempts (and move their outbox rows on) in the next group's transaction, so
        that they share its commit; returns the attempts that exhausted ``schedule``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[outbox.Attempt]] = loop.create_future()
        self._queue.put(_Record(attempts, schedule, future, loop))
        return await future

    def run(self, job: Callable[[sqlite3.Connection], Any]) -> Future[Any]:
        """Run ``job(connection)`` on the writer thread, between groups (checkpoints, probes)."""
        future: Future[Any] = Future()
        self._queue.put((job, future))
        return future

    # -- the writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        behind = True  # the full-text indexes may lack entries
        while True:
            due = self._indexed_at + SEARCH_INDEX_SECONDS - time.monotonic()
            try:
                item = get(timeout=max(due, CATCH_UP_SECONDS) if behind else IDLE_SECONDS)
            except queue.Empty:  # idle: a good moment to catch up on the search index
                behind = self._index_search()
                continue
            batch: list[_Queued] = []
            while True:
                if item is _STOP:
                    self._commit_group(batch)
                    deadline = time.monotonic() + STOP_INDEXING_SECONDS  # leave the indexes current
                    while time.monotonic() < deadline and self._index_search():
                        pass
                    return
                if isinstance(item, _Pending | _Record):
                    batch.append(item)
                else:
                    self._commit_group(batch)
                    batch = []
                    self._run_job(item)
                if len(batch) >= self.max_batch:
                    break
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
            self._commit_group(batch)  # answers first; then, now and then, a small indexing batch
            behind = True
            since = time.monotonic() - self._indexed_at
            if since >= SEARCH_INDEX_LATEST or (since >= SEARCH_INDEX_SECONDS and self._queue.empty()):
                behind = self._index_search()

    def _index_search(self) -> bool:
        """Index one batch; whether there may be more to index."""
        self._indexed_at = time.monotonic()
        if (
            self._failed_rows or not self.index_search
        ):  # during a fault episode the index waits: no extra busy-timeout stalls
            return False
        assert self._conn is not None
        try:
            return search.index_new_entries(self._conn) > 0
        except sqlite3.Error as exc:  # derived data: retried on the next round
            log.debug("search indexing deferred: %s", exc)
            return False

    def _checkpoint(self) -> None:
        """Copy the WAL into the database file from a connection of its own, beside the writer.

        SQLite checkpoints when a commit leaves the WAL past 1,000 pages, inside that COMMIT: the group's
        answers then waited for ~4 MB to be copied and the database file synced. A PASSIVE checkpoint
        here does that work while the writer goes on committing; the writer's own checkpoints then only
        find the last few pages left, and the WAL still restarts from its beginning as before.
        """
        conn: sqlite3.Connection | None = None
        while not self._stopping.wait(CHECKPOINT_SECONDS):
            try:
                conn = conn or sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:  # the next round tries again; the writer's own still run
                log.debug("background checkpoint deferred: %s", exc)
        if conn is not None:
            conn.close()

    def _run_job(self, item: object) -> None:
        job: Callable[[sqlite3.Connection | None], Any]
        future: Future[Any]
        job, future = item  # type: ignore[misc]
        if not future.set_running_or_notify_cancel():  # the caller gave up waiting (e.g. /readyz timed out)
            return
        try:
            result = job(self._conn)
        except BaseException as exc:  # the job's caller sees it
            future.set_exception(exc)
        else:
            future.set_result(result)

    def probe(self) -> Future[None]:
        """A real durable write (the heartbeat row, committed): readiness, and the end of a fault episode."""

        def job(conn: sqlite3.Connection) -> None:
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT OR REPLACE INTO heartbeat (id, at) VALUES (1, strftime('%Y-%m-%dT%H:%M:%fZ'))"
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._recovered()

        return self.run(job)

    def _commit_group(self, batch: list[_Queued]) -> None:
        if not batch:
            return
        try:
            results = self._commit(batch)
        except Exception as exc:
            # Lock, disk and permission faults fail every row alike: fail the group at once. Anything
            # else may be one bad row: retry the rows one by one so that it fails alone.
            if len(batch) == 1 or isinstance(exc, sqlite3.OperationalError):
                self._fail(batch, exc)
                return
            log.warning("a group of %d rows failed (%s); retrying them one by one", len(batch), exc)
            for pending in batch:
                self._commit_group([pending])
            return
        self._recovered()
        _resolve(batch, results)

    # -- fault episodes: logged once when they begin and once when they end, not per request --------
    @property
    def failing(self) -> bool:
        """The last write failed and none has succeeded since."""
        return self._failed_rows > 0

    def _recovered(self) -> None:
        if self._failed_rows:
            log.warning("audit log writes recovered; %d rows were refused (answered 503)", self._failed_rows)
            self._failed_rows = 0

    def _fail(self, batch: list[_Queued], exc: Exception) -> None:
        rows = sum(isinstance(item, _Pending) for item in batch)
        error = AppendError(f"{type(exc).__name__}: {exc}")
        for item in batch:
            item.loop.call_soon_threadsafe(_set_exception, item.future, error)
        if not rows:  # only delivery records: their outbox rows stay pending and are attempted again
            return
        if self.observer is not None:
            self.observer.batch_failed(rows)
        if not self._failed_rows:
            log.error(
                "audit log writes failing (%s: %s); answering 503 until they succeed", type(exc).__name__, exc
            )
        self._failed_rows += rows

    def _commit(self, batch: list[_Queued]) -> list[Committed | list[outbox.Attempt]]:
        conn = self._conn
        assert conn is not None
        started = time.perf_counter()
        pending = [p for p in batch if isinstance(p, _Pending)]
        records = [r for r in batch if isinstance(r, _Record)]
        results, counts, exhausted = append_batch(
            conn, [(p.row, p.event, p.forward) for p in pending], [(r.attempts, r.schedule) for r in records]
        )
        if self.observer is not None and pending:
            try:
                self.observer.batch_committed(
                    [p.row for p in pending], time.perf_counter() - started, results[-1].id
                )
                if counts is not None:
                    self.observer.topics_counted(*counts)
            except Exception:  # the rows are committed: a reporting bug must not turn them into 503s
                log.exception("the writer's observer failed")
        committed, recorded = iter(results), iter(exhausted)
        return [next(committed) if isinstance(item, _Pending) else next(recorded) for item in batch]


def append_batch(
    conn: sqlite3.Connection,
    items: list[tuple[dict[str, Any], models.TopicEvent | None]] | list[Item],
    deliveries: list[tuple[list[outbox.Attempt], tuple[int, ...]]] | None = None,
) -> tuple[list[Committed], tuple[int, int] | None, list[list[outbox.Attempt]]]:
    """Append ``items`` (row, event to project[, forwarding]) and record ``deliveries`` (attempts, retry
    schedule) in one transaction on ``conn`` (autocommit mode).

    Fills in each row's ``id``, chain links and, for topic events, ``outcome`` and ``duplicate_of``.
    Returns what was committed; when the group changed any topic's state, the topics now active and
    deleted (``topic_counts``, kept in the same transaction); and for each of ``deliveries`` the
    attempts that exhausted their schedule.

    The group costs a fixed handful of statements whatever its size: the chain head, one read of the
    topics it touches, the log rows and the changed topics in one ``executemany`` each, the hourly
    rollups, the outbox rows and Before-callback attempts when forwarding, and the COMMIT.
    """
    delta = {"active": 0, "deleted": 0}
    counts = None
    results: list[Committed] = []
    exhausted: list[list[outbox.Attempt]] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        head = conn.execute(_HEAD).fetchone()
        head_id, head_hash = head if head is not None else (0, chain.GENESIS)
        store = projection.SqlStore(conn)
        store.prefetch(
            [t for item in items if (event := item[1]) is not None for t in projection.topic_ids(event)]
        )
        rows = []
        queued: dict[float, list[tuple[int, str, str]]] = {}
        before_attempts: list[outbox.Attempt] = []
        for row, event, *rest in items:
            head_id += 1
            forward = rest[0] if rest else None
            if forward is not None:
                for destination in forward.destinations:
                    queued.setdefault(forward.delay, []).append((head_id, destination, row["received_at"]))
                if forward.before is not None:
                    forward.before.audit_id = head_id
                    before_attempts.append(forward.before)
            if event is not None:
                sha = row["request_body_sha256"]
                effect = projection.project(event, head_id, row["received_at"], sha, store.lookup)
                row["outcome"], row["duplicate_of"] = effect.outcome, effect.duplicate_of
                store.write(effect, sha, head_id)
                for before, after in effect.changes:
                    if (was := projection.state(before)) != (now := projection.state(after)):
                        if was is not None:
                            delta[was] -= 1
                        if now is not None:
                            delta[now] += 1
            row["id"], row["prev_hash"] = head_id, head_hash
            row["entry_hash"] = head_hash = chain.entry_hash(row)
            rows.append(row)
            results.append(Committed(head_id, row["outcome"], row["duplicate_of"], head_hash))
        store.flush()
        if rows:
            conn.executemany(_INSERT, rows)
            rollups.add(conn, rows)
        for delay, triples in queued.items():
            outbox.queue(conn, triples, delay)
        if before_attempts:
            outbox.append(conn, before_attempts)
        if deliveries:
            now = outbox.now_iso()
            exhausted = [outbox.record_in(conn, attempts, schedule, now) for attempts, schedule in deliveries]
        if delta["active"] or delta["deleted"]:
            found = dict(conn.execute(_COUNT, (delta["active"], delta["deleted"])).fetchall())
            counts = found["active"], found["deleted"]
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results, counts, exhausted


def _resolve(batch: list[_Queued], results: list[Committed | list[outbox.Attempt]]) -> None:
    # One wake-up per event loop for the whole group, not one per request.
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for item, result in zip(batch, results, strict=True):
        by_loop.setdefault(item.loop, []).append((item.future, result))
    for loop, pairs in by_loop.items():
        loop.call_soon_threadsafe(_set_results, pairs)


def _set_results(pairs: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, result in pairs:
        if not future.done():
            future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
