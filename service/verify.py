"""Checks an auditor runs on a log: the chain, the ids, the body hashes, and the projection.

Each finding names the first bad entry (or topic). Nothing here writes to the database.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service import chain, checkpoints, projection


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    """``ids``, ``body``, ``chain``, ``hash``, ``projection``, ``replay`` or ``checkpoint_*``."""
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
    before_prev: str | None = None
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
            if row["prev_hash"] == before_prev:  # links past the previous entry: that one was inserted
                note(
                    "chain",
                    entry_id - 1,
                    f"entry {entry_id - 1} was inserted: entry {entry_id} links past it",
                )
            else:
                note("chain", entry_id, "prev_hash is not the previous entry's entry_hash")
        if chain.entry_hash(row) != row["entry_hash"]:
            note("hash", entry_id, "entry_hash does not match the entry's canonical form")
        before_prev, prev_hash, expected_id = prev_hash, row["entry_hash"], entry_id + 1
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


def verify_checkpoints(
    conn: sqlite3.Connection, file: Path, count: int, pinned_key: str | None = None
) -> list[Finding]:
    """Every checkpoint in ``file``: signature, key, chain of digests, and the log still holding its prefix.

    ``count`` is the number of rows in the log. A rewritten log is reported from the first entry after
    the last checkpoint that still matches (the altered entry lies between the two checkpoints).
    """
    found: dict[str, Finding] = {}

    def note(check: str, entry_id: int | None, message: str) -> None:
        found.setdefault(check, Finding(check, entry_id, message))

    lines = checkpoints.read_file(file)
    stored = [r[0] for r in conn.execute("SELECT digest FROM checkpoints ORDER BY id")]
    if not lines and stored:
        note("checkpoint_file", None, f"{file} is missing but the database records {len(stored)} checkpoints")
    in_file = [c.get("digest") for c in lines]
    # The database may lag the file by one checkpoint (a crash between the two writes), never lead it.
    if stored != in_file[: len(stored)] or len(in_file) - len(stored) > 1:
        note("checkpoint_table", None, "the checkpoints table does not match the checkpoint file")

    prev_digest, key, matched_size = chain.GENESIS, pinned_key, 0
    for number, cp in enumerate(lines, 1):
        if not checkpoints.signature_ok(cp):
            note("checkpoint_signature", None, f"checkpoint {number}: signature or digest invalid")
            continue
        size = int(cp["log_size"])
        if key is None:
            key = cp["public_key"]
        if cp["public_key"] != key:
            note(
                "checkpoint_key",
                size,
                f"checkpoint {number}: signed by another key ({cp['public_key'][:16]}…)",
            )
        if cp["prev_digest"] != prev_digest:
            note(
                "checkpoint_chain", size, f"checkpoint {number}: prev_digest is not the previous checkpoint's"
            )
        prev_digest = cp["digest"]
        if size > count:
            note(
                "checkpoint_prefix",
                count + 1,
                f"checkpoint {number} covers {size} entries but the log has {count}: entries removed",
            )
            continue
        if size == 0:
            continue
        row = conn.execute("SELECT entry_hash FROM audit_log WHERE id = ?", (size,)).fetchone()
        if row is None or row[0] != cp["head_hash"]:
            note(
                "checkpoint_prefix",
                matched_size + 1,
                f"checkpoint {number}: entry {size} is not the signed head; the log was altered in entries "
                f"{matched_size + 1}..{size}",
            )
        elif "checkpoint_prefix" not in found:
            matched_size = size
    return sorted(found.values(), key=lambda f: f.entry_id or 0)


def verify_all(
    conn: sqlite3.Connection,
    checkpoint_file: Path,
    pinned_key: str | None = None,
    progress: Progress | None = None,
) -> tuple[list[Finding], int, str]:
    """Every check: (findings, entries, head hash)."""
    findings, count, head = verify_chain(conn, progress)
    findings += verify_checkpoints(conn, checkpoint_file, count, pinned_key)
    findings += verify_projection(conn)
    return findings, count, head


def first_bad_id(findings: list[Finding]) -> int | None:
    """The earliest log entry known to be bad. Checks that pin an entry win over checkpoint ranges (which
    only say that something between two checkpoints changed); a projection finding names the entry that
    last changed the topic, which is context rather than a bad entry, so it counts last."""
    tiers: tuple[list[int], list[int], list[int]] = ([], [], [])
    for f in findings:
        if f.entry_id is not None:
            tier = 2 if f.check == "projection" else 1 if f.check.startswith("checkpoint") else 0
            tiers[tier].append(f.entry_id)
    return min(next((t for t in tiers if t), []), default=None)
