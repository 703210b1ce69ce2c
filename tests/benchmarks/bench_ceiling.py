"""How fast SQLite itself takes these rows (`python -m tests.benchmarks.bench_ceiling`), against the
writer's append transaction, in the same run, printed as Markdown.

1. The real append transaction (:func:`topic_audit.writer.append.append_batch`: chain, projection, rollups,
   content keys, the rows), in groups, ``synchronous=FULL``.
2. The very rows it stored, read back and INSERTed into a fresh ``audit_log`` with its indexes and
   triggers, nothing else (no projection, no rollups, no Python per row): what the log's own table costs.
3. The same, with the secondary indexes of ``audit_log`` dropped: the floor for rows of this size.

Each is a fresh file, committed in groups of CEILING_GROUP (256) rows, CEILING_ROWS (20,000) rows, the
median of CEILING_ROUNDS (3) rounds, each running the three in another order. If (3) is below the
writer's target, no change to the Python on the commit path can reach it: only fewer or smaller pages
per row can.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from topic_audit.log import chain
from topic_audit.log.migrations import migrate
from topic_audit.writer.append import append_batch
from topic_audit.writer.thread import connect

from tests.benchmarks.logs import decided

ROWS = int(os.environ.get("CEILING_ROWS", "20000"))
GROUP = int(os.environ.get("CEILING_GROUP", "256"))
ROUNDS = int(os.environ.get("CEILING_ROUNDS", "3"))
_INSERT = (
    f"INSERT INTO audit_log ({', '.join(chain.COLUMNS)}) VALUES ({', '.join('?' for _ in chain.COLUMNS)})"
)


def _fresh(folder: Path, name: str) -> sqlite3.Connection:
    db = folder / f"{name}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    migrate(db)
    return connect(db)


def appended(folder: Path, items: list[Any]) -> tuple[float, list[tuple[Any, ...]]]:
    """Rows/s of the real append transaction; the rows it stored."""
    conn = _fresh(folder, "appended")
    started = time.perf_counter()
    for i in range(0, len(items), GROUP):
        append_batch(conn, items[i : i + GROUP])
    rate = len(items) / (time.perf_counter() - started)
    rows = [tuple(r) for r in conn.execute(f"SELECT {', '.join(chain.COLUMNS)} FROM audit_log ORDER BY id")]
    conn.close()
    return rate, rows


def inserted(folder: Path, rows: list[tuple[Any, ...]], indexes: bool) -> float:
    """Rows/s of ``rows`` INSERTed alone into ``audit_log`` (with its secondary indexes or without)."""
    conn = _fresh(folder, "inserted")
    if not indexes:
        names = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit_log' AND sql IS NOT NULL"
        ).fetchall()
        for (name,) in names:
            conn.execute(f'DROP INDEX "{name}"')
    started = time.perf_counter()
    for i in range(0, len(rows), GROUP):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_INSERT, rows[i : i + GROUP])
        conn.execute("COMMIT")
    rate = len(rows) / (time.perf_counter() - started)
    conn.close()
    return rate


def main() -> None:
    items = decided(ROWS, 5)
    labels = (
        "the append transaction",
        "its rows alone, with the log's indexes",
        "its rows alone, no secondary index",
    )
    rates: dict[str, list[float]] = {label: [] for label in labels}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        _, rows = appended(folder, items)  # the rows to insert alone (an untimed first append)
        for round_ in range(ROUNDS):
            for which in (round_ + k for k in range(len(labels))):  # each round in another order
                label = labels[which % len(labels)]
                if label == labels[0]:
                    rate, rows = appended(folder, items)
                else:
                    rate = inserted(folder, rows, label == labels[1])
                rates[label].append(rate)
    base = statistics.median(rates["the append transaction"])
    print(f"{ROWS:,} rows in groups of {GROUP}, synchronous=FULL, median of {ROUNDS} rounds\n")
    print("| what is committed | rows/s | ÷ the append transaction |")
    print("|---|---:|---:|")
    for label, values in rates.items():
        median = statistics.median(values)
        print(f"| {label} | {median:,.0f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
