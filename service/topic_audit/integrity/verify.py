"""``topic-audit verify``: every integrity check from the start (:mod:`topic_audit.integrity`), then the
projection against a replay of the log.

Each finding names the first bad entry (or topic). Nothing here writes to the database.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from topic_audit.integrity import Checker, Finding, first_bad_id
from topic_audit.integrity.entries import ChainResult, Progress, Start, verify_chain
from topic_audit.log import chain, projection
from topic_audit.log.database import read_only

__all__ = ["Finding", "first_bad_id", "verify_all", "verify_chain", "verify_projection"]


def verify_projection(conn: sqlite3.Connection) -> list[Finding]:
    """The ``topics`` table must equal a replay of the log, and every accepted entry must replay as such."""
    store, mismatches, _ = projection.replay(conn)
    findings = [
        Finding("replay", m.entry_id, f"recorded as accepted but replays as {m.replayed_outcome}")
        for m in mismatches[:1]
    ]
    replayed_counts = store.counts()
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'topic_counts'").fetchone():
        stored = projection.stored_counts(conn)
        if stored != replayed_counts:
            findings.append(
                Finding("projection", None, f"topic_counts is {stored}; the log gives {replayed_counts}")
            )
    for difference in projection.differences(conn, store.rows)[:1]:  # the first in key order
        if difference.replayed is None:
            assert difference.stored is not None
            entry = difference.stored[projection.COLUMNS.index("updated_entry_id")]
            message = "in topics but not in the log"
        elif difference.stored is None:
            entry, message = difference.replayed["updated_entry_id"], "missing from topics"
        else:
            pairs = zip(
                projection.COLUMNS, projection.row_values(difference.replayed), difference.stored, strict=True
            )
            entry = difference.replayed["updated_entry_id"]
            message = f"differs from the log in {', '.join(c for c, a, b in pairs if a != b)}"
        findings.append(Finding("projection", entry, message, difference.topic_id))
    return findings


PARALLEL_FROM = 50_000
CHUNKS_PER_PROCESS = 8


def verify_all(
    conn: sqlite3.Connection,
    checkpoint_file: Path,
    pinned_key: str | None = None,
    show_progress: bool = False,
) -> tuple[list[Finding], int, str]:
    """Every check, from the start, then the projection: (findings, entries, head hash)."""
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    projection_findings: list[Finding] = []
    run = _Chain(path, show_progress, lambda: projection_findings.extend(verify_projection(conn)))
    checker = Checker(checkpoint_file, pinned_key, run)
    with projection.paused_gc(), checker.snapshot(conn) as snapshot:
        findings = checker.advance(snapshot)
        if not run.ran:  # an empty log
            run.meanwhile()
    return findings + projection_findings, checker.entries.appended, checker.entries.verified[1]


class _Chain:
    """The chain for :class:`~topic_audit.integrity.Checker`, with ``meanwhile`` (the projection's
    replay) done while it runs.

    On a large log the chain is recomputed in ranges by a pool of processes (one per core but one, each
    on its own read-only connection) while this process does ``meanwhile``; then this process takes the
    ranges no worker has started, so every core is busy until the end.
    """

    def __init__(self, path: str, show_progress: bool, meanwhile: Callable[[], None]) -> None:
        self.path, self.show_progress, self.meanwhile = path, show_progress, meanwhile
        self.ran = False

    def __call__(self, conn: sqlite3.Connection, ids: tuple[int, int], start: Start) -> ChainResult:
        self.ran = True
        low, high = ids
        if high - low < PARALLEL_FROM:  # starting processes costs more than it saves on a small log
            with _progress(high - low, self.show_progress) as advance:
                result = verify_chain(conn, advance, ids, start)
            self.meanwhile()
            return result
        workers = max((os.cpu_count() or 2) - 1, 1)  # this process has the replay to do meanwhile
        step = -(-(high - low) // ((workers + 1) * CHUNKS_PER_PROCESS))
        ranges = [(first, min(first + step, high)) for first in range(low, high, step)]
        results: list[ChainResult | None] = [None] * len(ranges)
        with (
            _progress(high - low, self.show_progress) as advance,
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool,
        ):
            parts = [pool.submit(_chain_range, self.path, part) for part in ranges]
            for part in parts:
                part.add_done_callback(lambda future: future.cancelled() or advance(future.result()[1]))
            self.meanwhile()
            # Then this process takes the ranges no worker has started yet, from the end.
            for index in reversed(range(len(parts))):
                if parts[index].cancel():
                    results[index] = stolen = _chain_range(self.path, ranges[index])
                    advance(stolen[1])
            done = [r if r is not None else part.result() for r, part in zip(results, parts, strict=True)]
        found: dict[str, Finding] = {}
        for part_findings, _, _ in done:  # the first finding of each kind, in log order
            for finding in part_findings:
                found.setdefault(finding.check, finding)
        count = sum(r[1] for r in done)
        head = next((r[2] for r in reversed(done) if r[1]), chain.GENESIS)
        return sorted(found.values(), key=lambda f: f.entry_id or 0), count, head


@contextlib.contextmanager
def _progress(total: int, show: bool) -> Iterator[Progress]:
    if not show:
        yield lambda _: None
        return
    import click

    lock = threading.Lock()  # advanced from this thread and from the pool's result thread

    def advance(steps: int) -> None:
        with lock:
            bar.update(steps)

    with click.progressbar(length=total, label="verifying", file=sys.stderr) as bar:
        yield advance


def _chain_range(path: str, ids: tuple[int, int]) -> ChainResult:
    """One range, in a process of the pool (or this one), on a read-only connection of its own."""
    conn = read_only(path)
    try:
        with projection.paused_gc():
            return verify_chain(conn, ids=ids)
    finally:
        conn.close()
