"""Erasing the content of log entries: on a data subject's request, by retention, or by policy.

One erasure is ONE transaction (:func:`erase_batch`): the ``erasures`` record (chained like
``deliveries``), an ``erased_entries`` row per entry, and every copy of the entries' content:

- ``audit_log``'s content columns set to their erased values (:data:`topic_audit.log.content.ERASED`) and
  the entries' salts deleted from ``content_keys`` (the append-only triggers allow exactly this);
- their rows in ``audit_log_fts`` (external content: removed with the values it indexed);
- the app's answers in ``deliveries`` (``response_body``, ``detail``);
- the topics they touched, replayed again with the erased entries contributing evidence only
  (:func:`topic_audit.privacy.redaction.replay_topics`), and those topics' rows in ``topics_fts``.

The record and what it commits to: :mod:`topic_audit.privacy.records`. An entry that no longer matches what
was written is not erased (:class:`Tampered`): blanking it would hide the change.

A SIGKILL leaves either nothing or a complete, recorded erasure. A larger selection is split into
records of at most :data:`BATCH` entries, each its own short transaction, so that the write lock is never
held for long while ``serve`` answers.

After the last batch, :func:`topic_audit.privacy.purge.purge` removes what SQLite keeps of deleted data (the
full-text indexes' old segments, freed pages, the WAL).

``erased_entries.effects`` is what the projection needs to replay an erased topic event
(:mod:`topic_audit.privacy.redaction`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from topic_audit.log import chain, content, reindex
from topic_audit.log.chain import GENESIS
from topic_audit.log.database import transaction
from topic_audit.privacy import redaction, subjects
from topic_audit.privacy.purge import purge
from topic_audit.privacy.records import Erasure, insert_record
from topic_audit.privacy.records import selector_digest as selector_digest
from topic_audit.privacy.records import selector_key as selector_key

BATCH: Final = 500
"""Most entries one erasure record covers (one transaction)."""
CAUSES: Final = ("request", "retention", "policy")
_BLANKED: Final = ", ".join(f"{c} = ?" for c in content.CONTENT)


class Tampered(ValueError):
    """Entries selected for erasure that no longer match what was written: erasing them would blank the
    content that shows the change (an entry written before keyed commitments is then checked only
    through its erasure record, which would commit to it as found), so erasure refuses."""

    def __init__(self, found: Sequence[tuple[int, str]]) -> None:
        self.ids = [entry_id for entry_id, _ in found]
        first, why = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        super().__init__(
            f"entry {first} {why}{more}: not erasing it, which would hide the change "
            "(`topic-audit verify` shows it)"
        )


_CHECKED: Final = (
    "SELECT {}, (SELECT p.entry_hash FROM audit_log p WHERE p.id = a.id - 1), k.salt FROM audit_log a "
    "LEFT JOIN content_keys k ON k.entry_id = a.id WHERE a.id IN ({}) ORDER BY a.id"
)


def tampered(conn: sqlite3.Connection, ids: Sequence[int]) -> list[tuple[int, str]]:
    """The entries of ``ids`` that fail their own check, with why: the link to the entry before, the
    entry's hash, its body's hash, and (with a keyed commitment) the commitment under its salt. Reads
    the columns the table has (a dry run may read a log not yet migrated)."""
    stored = {row[1] for row in conn.execute("PRAGMA table_info(audit_log)")}
    names = [c for c in chain.COLUMNS if c in stored]
    found, width = [], len(names)
    for start in range(0, len(ids), BATCH):
        chunk = list(ids[start : start + BATCH])
        query = _CHECKED.format(", ".join(f"a.{c}" for c in names), ", ".join("?" * len(chunk)))
        for values in conn.execute(query, chunk):
            row = dict(zip(names, values[:width], strict=True))
            why = _changed(row, values[width], values[width + 1])
            if why is not None:
                found.append((int(row["id"]), why))
    return found


def _changed(row: dict[str, Any], before: str | None, salt: bytes | None) -> str | None:
    if row["prev_hash"] != (GENESIS if row["id"] == 1 else before):
        return "does not link to the entry before it"
    try:
        if chain.entry_hash(row) != row["entry_hash"]:
            return "does not match its entry_hash"
        if hashlib.sha256(chain.body_bytes(row["request_body"])).hexdigest() != row["request_body_sha256"]:
            return "has a request_body that does not match its request_body_sha256"
        committed = row.get("content_commitment")
        if committed is not None and (salt is None or content.commitment(salt, row) != committed):
            return "has content that does not match its commitment"
    except (TypeError, ValueError):  # a value of a type the receiver never writes (an integer body, say)
        return "holds a value of a type the receiver never writes"
    return None


def erase_batch(
    conn: sqlite3.Connection,
    ids: Sequence[int],
    cause: str,
    reason: str,
    selector: str | None,
    now: str,
    key: Ed25519PrivateKey | None = None,
) -> Erasure | None:
    """Erase the content of entries ``ids`` (not yet erased; at most :data:`BATCH`) in one transaction
    on the autocommit connection ``conn``, under a record signed with ``key`` (the checkpoint signing
    key); None when every one was erased meanwhile. Raises :class:`Tampered` (and erases nothing) when
    one fails its own check."""
    if cause not in CAUSES:
        raise ValueError(f"unknown cause {cause!r}")
    with transaction(conn):
        rows = _live_rows(conn, ids)
        if not rows:
            return None
        erased = sorted(r["id"] for r in rows)
        found = tampered(conn, erased)
        if found:
            raise Tampered(found)
        effects = [(r["id"], redaction.effects(r["callback_command"], r["request_body"])) for r in rows]
        record = insert_record(conn, effects, cause, reason, selector, now, key)
        indexed = _unindex(conn, rows)
        blank = [content.ERASED[c] for c in content.CONTENT]
        conn.executemany(f"UPDATE audit_log SET {_BLANKED} WHERE id = ?", [(*blank, i) for i in erased])
        conn.executemany("DELETE FROM content_keys WHERE entry_id = ?", [(i,) for i in erased])
        conn.executemany(
            "UPDATE deliveries SET response_body = NULL, detail = NULL WHERE audit_id = ? "
            "AND (response_body IS NOT NULL OR detail IS NOT NULL)",
            [(i,) for i in erased],
        )
        # Nothing is left to deliver: a pending delivery of an erased entry ends here.
        conn.executemany(
            "UPDATE outbox SET state = 'failed', last_error = 'erased', next_attempt_at = NULL "
            "WHERE audit_id = ? AND state = 'pending'",
            [(i,) for i in erased],
        )
        indexed = redaction.replay_topics(conn, rows) or indexed
    return dataclasses.replace(record, indexed=indexed)


def _live_rows(conn: sqlite3.Connection, ids: Sequence[int]) -> list[dict[str, Any]]:
    if len(ids) > BATCH:
        raise ValueError(f"at most {BATCH} entries in one erasure")
    marks = ", ".join("?" * len(ids))
    cursor = conn.execute(
        "SELECT id, callback_command, request_body, detail, topic_id FROM audit_log "
        f"WHERE id IN ({marks}) AND id NOT IN (SELECT entry_id FROM erased_entries WHERE entry_id IN ({marks}))",
        [*ids, *ids],
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def _unindex(conn: sqlite3.Connection, rows: list[dict[str, Any]]) -> bool:
    """Remove the entries from ``audit_log_fts`` (only those it already indexed: it indexes in id order,
    behind the writer, and will find their content gone when it reaches the others)."""
    indexed = int(conn.execute("SELECT coalesce(max(id), 0) FROM audit_log_fts_docsize").fetchone()[0])
    held = [(r["id"], r["request_body"], r["detail"]) for r in rows if r["id"] <= indexed]
    for table, upto in reindex.copies(conn, "audit_log_fts"):  # and a rebuild's next index
        conn.executemany(
            f"INSERT INTO {table} ({table}, rowid, request_body, detail) VALUES ('delete', ?, ?, ?)",
            [row for row in held if row[0] <= upto],
        )
    return bool(held)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one ``erase`` or ``retain`` run did."""

    records: list[Erasure]
    purged: bool = True
    """Whether the purge completed (see :func:`purge`)."""
    erased_at: float = 0.0
    """When the last record committed, before the purge (``time.time()``): copies written before it may
    hold erased values (:func:`topic_audit.privacy.purge.copies_left`)."""

    @property
    def entries(self) -> int:
        return sum(r.entries for r in self.records)


def erase(
    conn: sqlite3.Connection,
    ids: Sequence[int],
    cause: str,
    reason: str,
    selector: str | None,
    now: str,
    batch: int = BATCH,
    pause: float = 0.0,
    on_erased: Callable[[int], None] | None = None,
    key: Ed25519PrivateKey | None = None,
) -> Outcome:
    """Erase ``ids`` in records of at most ``batch`` entries (``pause`` seconds between them, so that
    another writer gets the lock), each signed with ``key``, then :func:`purge` the files -- always,
    even when every entry was erased before (an earlier run's purge may not have finished).
    ``on_erased`` is told each record's entries as it commits. Raises :class:`Tampered` before erasing
    any when one fails its check."""
    found = tampered(conn, ids)
    if found:
        raise Tampered(found)
    records = []
    for start in range(0, len(ids), batch):
        if start and pause:
            time.sleep(pause)
        done = erase_batch(conn, ids[start : start + batch], cause, reason, selector, now, key)
        if done is not None:
            records.append(done)
            if on_erased is not None:
                on_erased(done.entries)
    erased_at = time.time()
    purged = purge(conn, merge=any(r.indexed for r in records) or not records)
    return Outcome(records, purged, erased_at)


def retain(
    conn: sqlite3.Connection,
    older_than: timedelta,
    now: str,
    batch: int = BATCH,
    pause: float = 0.0,
    on_erased: Callable[[int], None] | None = None,
    key: Ed25519PrivateKey | None = None,
) -> Outcome:
    """Erase the content of every entry received more than ``older_than`` ago (cause ``retention``)."""
    ids, reason = retention_plan(conn, older_than)
    return erase(conn, ids, "retention", reason, None, now, batch, pause, on_erased, key)


def retention_plan(conn: sqlite3.Connection, older_than: timedelta) -> tuple[list[int], str]:
    """What a retention run erases -- the entries received more than ``older_than`` ago, not yet erased
    -- and the reason its records give; ``retain`` here and ``serve``'s hourly run
    (:mod:`topic_audit.writer.retention`) both ask it."""
    before = subjects.horizon(older_than)
    ids = list(subjects.select(conn, subjects.Selector("older", before)))
    return ids, f"retention: older than {_age(older_than)} (received before {before})"


def _age(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and not seconds % size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


POLICY_REASON: Final = (
    "TOPIC_AUDIT_STORE_BODIES=topics: callbacks outside the topic family keep evidence only"
)


def record_policy(
    conn: sqlite3.Connection, ids: Sequence[int], now: str, key: Ed25519PrivateKey | None = None
) -> Erasure | None:
    """The record of entries written without their content (``TOPIC_AUDIT_STORE_BODIES=topics``), in
    the transaction that appends them, signed with ``key``."""
    if not ids:
        return None
    return insert_record(conn, [(i, None) for i in ids], "policy", POLICY_REASON, None, now, key)
