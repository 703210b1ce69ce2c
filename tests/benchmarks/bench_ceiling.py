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

Then the budget a row has when the writer process is to reach a share of (3) (``make bench``'s target:
0.4), beside what the steps every row must take cost alone, in process, on the same rows: decoding its
frame, sealing its content (a salt, an HMAC), its chain hash, the projection of its event, and its
answer's frame. What they leave is what SQLite, the socket and the event loop may cost.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from topic_audit.log import chain, content, projection
from topic_audit.log.migrations import migrate
from topic_audit.writer import wire
from topic_audit.writer.append import append_batch
from topic_audit.writer.requests import Committed
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


def steps(items: list[Any]) -> dict[str, float]:
    """µs a row of each step every row takes in the writer, alone, over ``items`` (best of 3)."""
    frames = [wire.append_frame(n, row, event, None)[wire.HEADER :] for n, (row, event) in enumerate(items)]
    rows = [dict(row) for row, _ in items]
    for n, row in enumerate(rows):
        row.update(id=n + 1, prev_hash=chain.GENESIS, outcome="accepted", duplicate_of=None)
    events = [(n + 1, event, row) for n, (row, event) in enumerate(items) if event is not None]

    def decode() -> None:
        for body in frames:
            wire.request(body)

    def seal() -> None:
        for row in rows:
            content.seal(dict(row), True)

    def hashed() -> None:
        for row in rows:
            row["content_commitment"] = "0" * 64
            chain.entry_hash(row)

    def project() -> None:
        store = projection.MemoryStore()
        for entry_id, event, row in events:
            effect = projection.project(event, entry_id, row["received_at"], "", store.lookup)
            store.write(effect, "", entry_id)

    def answer() -> None:
        for n in range(len(rows)):
            wire.answer(n, wire.OK, Committed(n, "accepted", None, chain.GENESIS))

    found = {}
    for label, step in (
        ("decode the row's frame", decode),
        ("seal its content (salt, HMAC-SHA-256)", seal),
        ("its chain hash (canonical JSON, SHA-256)", hashed),
        ("project its event (in memory, no SQL)", project),
        ("encode its answer's frame", answer),
    ):
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - started)
        found[label] = best / len(items) * 1e6
    return found


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
    floor = statistics.median(rates[labels[2]])
    share = float(os.environ.get("CEILING_SHARE", "0.4"))
    budget = 1e6 / (share * floor)
    costs = steps(items)
    print(
        f"\nA row's budget at {share:g} of the floor ({floor:,.0f} rows/s): {budget:.1f} µs, of which SQLite's"
    )
    print(
        f"own work on the row (the floor) takes {1e6 / floor:.1f} µs. What the steps every row takes cost alone:\n"
    )
    print("| step | µs a row |")
    print("|---|---:|")
    for label, cost in costs.items():
        print(f"| {label} | {cost:.1f} |")
    rest = budget - 1e6 / floor - sum(costs.values())
    print(
        f"| **left for everything else** (the projection's SQL, the topics' upsert, content keys, rollups, the "
        f"event loop, the socket, the COMMIT's other pages) | **{rest:.1f}** |"
    )


if __name__ == "__main__":
    main()
