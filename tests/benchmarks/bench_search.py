"""The writer's full-text batches while it catches up: how long each holds the writer, with the indexes
merged by hand a few pages a batch (what the writer does) against FTS5's own merging (its default).

``python -m tests.benchmarks.bench_search`` (``BENCH_SEARCH_ROWS``, default 100,000): a generated log
whose indexes are emptied, then indexed batch by batch from a fresh copy in each mode, alternating
(``BENCH_ROUNDS``, default 2).
"""

from __future__ import annotations

import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from topic_audit.log import search
from topic_audit.writer.thread import connect

from tests.benchmarks import bench
from tests.benchmarks.logs import generate_log


def unindexed(folder: Path, rows: int) -> Path:
    """A log of ``rows`` generated entries whose full-text indexes hold nothing yet."""
    db = folder / "unindexed.db"
    generate_log(db, rows)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("INSERT INTO audit_log_fts (audit_log_fts) VALUES ('delete-all')")
    conn.execute("DELETE FROM topics_fts")
    conn.execute("UPDATE search_progress SET last_entry_id = 0 WHERE name = 'topics_fts'")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return db


def batches(source: Path, copy: Path, by_hand: bool) -> tuple[list[float], int]:
    """Milliseconds of each batch catching up on a copy of ``source``; the index's pages after."""
    shutil.copy(source, copy)
    conn = connect(copy, autocheckpoint=False)  # as in serve: the WAL is copied beside the writer
    try:
        if by_hand:
            search.merge_by_hand(conn)
        took = []
        while True:
            started = time.perf_counter()
            indexed = search.index_new_entries(conn)
            took.append((time.perf_counter() - started) * 1000)
            if not indexed:
                return took, conn.execute("SELECT count(*) FROM audit_log_fts_data").fetchone()[0]
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{copy}{suffix}").unlink(missing_ok=True)


def main() -> None:
    rows = int(bench.setting("SEARCH_ROWS", "100000"))
    rounds = int(bench.setting("ROUNDS", "2"))
    with tempfile.TemporaryDirectory() as folder:
        source = unindexed(Path(folder), rows)
        found: dict[bool, list[tuple[list[float], int]]] = {True: [], False: []}
        for round_ in range(rounds):
            for by_hand in (True, False)[round_ % 2 :] + (True, False)[: round_ % 2]:
                found[by_hand].append(batches(source, Path(folder) / "copy.db", by_hand))
    print(f"Catching up on {rows:,} entries, batches of {search.BATCH}, {rounds} rounds alternating:\n")
    print("| merging | batches | p50 ms | p99 ms | max ms | batches over 10 ms | index pages after |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for by_hand, label in (
        (False, "FTS5's own (automerge)"),
        (True, f"by hand, {search.MERGE_PAGES} pages a batch"),
    ):
        took = sorted(t for run, _ in found[by_hand] for t in run)
        pages = statistics.median(p for _, p in found[by_hand])
        over = sum(t > 10 for t in took) / rounds
        print(
            f"| {label} | {len(took) // rounds} | {took[len(took) // 2]:.2f} | "
            f"{took[int(len(took) * 0.99)]:.2f} | {took[-1]:.2f} | {over:.0f} | {pages:,.0f} |"
        )


if __name__ == "__main__":
    main()
