"""Checks an auditor runs on a log: the chain, the ids, the body hashes, and the projection.

Each finding names the first bad entry (or topic). Nothing here writes to the database.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from service import chain, projection


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    """``ids``, ``body``, ``chain``, ``hash``, ``projection`` or ``replay``."""
    entry_id: int | None
    message: str
    topic_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Progress = Callable[[int], None]


def _rows(conn: sqlite3.Connection) -> Iterator[dict[str, Any]]:
    cursor = conn.execute(f"SELECT {', '.join(chain.COLUMNS)} FROM audit_log ORDER BY id")
    while batch := cursor.fetchmany(10000):
        for values in batch:
            yield dict(zip(chain.COLUMNS, values, strict=True))


def verify_chain(
    conn: sqlite3.Connection, progress: Progress | None = None
) -> tuple[list[Finding], int, str]:
    """Recompute the chain. Returns the findings (the first of each kind), the row count and the head hash."""
    found: dict[str, Finding] = {}

    def note(check: str, entry_id: int | None, message: str) -> None:
        found.setdefault(check, Finding(check, entry_id, message))

    expected_id, prev_hash, count = 1, chain.GENESIS, 0
    for row in _rows(conn):
        entry_id = row["id"]
        count += 1
        if entry_id != expected_id:
            note(
                "ids",
                expected_id,
                f"expected id {expected_id}, found {entry_id}: entries missing or inserted",
            )
        if hashlib.sha256(chain.body_bytes(row["request_body"])).hexdigest() != row["request_body_sha256"]:
            note("body", entry_id, "request_body does not match request_body_sha256")
        if row["prev_hash"] != prev_hash:
            note("chain", entry_id, "prev_hash is not the previous entry's entry_hash")
        if chain.entry_hash(row) != row["entry_hash"]:
            note("hash", entry_id, "entry_hash does not match the entry's canonical form")
        prev_hash, expected_id = row["entry_hash"], entry_id + 1
        if progress is not None and count % 10000 == 0:
            progress(10000)
    if progress is not None:
        progress(count % 10000)
    return sorted(found.values(), key=lambda f: f.entry_id or 0), count, prev_hash


def verify_projection(conn: sqlite3.Connection) -> list[Finding]:
    """The ``topics`` table must equal a replay of the log, and every accepted entry must replay as such."""
    store, mismatches, _ = projection.replay(conn)
    findings = [
        Finding("replay", m.entry_id, f"recorded as accepted but replays as {m.replayed_outcome}")
        for m in mismatches[:1]
    ]
    live = {
        row[0]: dict(zip(projection.COLUMNS, row, strict=True))
        for row in conn.execute(f"SELECT {', '.join(projection.COLUMNS)} FROM topics")
    }
    for topic_id in sorted(set(live) | set(store.rows)):
        expected, actual = store.rows.get(topic_id), live.get(topic_id)
        if expected == actual:
            continue
        if actual is None:
            message = "missing from topics"
        elif expected is None:
            message = "in topics but not in the log"
        else:
            columns = [c for c in projection.COLUMNS if expected[c] != actual[c]]
            message = f"differs from the log in {', '.join(columns)}"
        entry = (expected or actual or {}).get("updated_entry_id")
        findings.append(Finding("projection", entry, message, topic_id))
        break
    return findings
