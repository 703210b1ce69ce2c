"""Erasing the content of log entries: on a data subject's request, by retention, or by policy.

One erasure is ONE transaction (:func:`erase_batch`): the ``erasures`` record (chained like
``deliveries``), an ``erased_entries`` row per entry, and every copy of the entries' content:

- ``audit_log``'s content columns set to their erased values (:data:`topic_audit.content.ERASED`) and
  the entries' salts deleted from ``content_keys`` (the append-only triggers allow exactly this);
- their rows in ``audit_log_fts`` (external content: removed with the values it indexed);
- the app's answers in ``deliveries`` (``response_body``, ``detail``);
- the topics they touched, replayed again with the erased entries contributing evidence only
  (:func:`topic_audit.projection.replay_topics`), and those topics' rows in ``topics_fts``.

A SIGKILL leaves either nothing or a complete, recorded erasure. A larger selection is split into
records of at most :data:`BATCH` entries, each its own short transaction, so that the write lock is never
held for long while ``serve`` answers.

After the last batch, :func:`purge` removes what SQLite keeps of deleted data: FTS5 (3.40 has no
``secure-delete``) keeps deleted terms in its index segments until they are merged, so both indexes are
merged into one segment; freed pages are zeroed (``PRAGMA secure_delete``); and the WAL, which still holds
the pages as they were before, is checkpointed into the database and truncated.

``erased_entries.effects`` is what the projection needs to replay an erased topic event
(:mod:`topic_audit.redaction`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from topic_audit import chain, content, outbox, redaction, subjects
from topic_audit.chain import GENESIS
from topic_audit.database import transaction

BATCH: Final = 500
"""Most entries one erasure record covers (one transaction)."""
CAUSES: Final = ("request", "retention", "policy")
COLUMNS: Final = (
    "id",
    "erased_at",
    "cause",
    "reason",
    "selector_digest",
    "first_id",
    "last_id",
    "entries",
    "entries_digest",
    "evidence_digest",
    "deliveries_upto",
    "prev_hash",
    "entry_hash",
)
_SORTED: Final = tuple(sorted(c for c in COLUMNS if c != "entry_hash"))
EVIDENCE: Final = tuple(c for c in chain.COLUMNS if c not in content.CONTENT)
"""The evidence columns of ``audit_log``, in table order."""
DELIVERY_EVIDENCE: Final = tuple(c for c in outbox.COLUMNS if c not in ("response_body", "detail"))
_BLANKED: Final = ", ".join(f"{c} = ?" for c in content.CONTENT)


@dataclass(frozen=True, slots=True)
class Erasure:
    """One recorded erasure: its ``erasures`` row."""

    id: int
    first_id: int
    last_id: int
    entries: int
    entry_hash: str
    indexed: bool = False
    """Whether a search index held some of its entries (then :func:`purge` must merge it)."""


def record_hash(row: dict[str, Any]) -> str:
    """``erasures.entry_hash``: SHA-256 of the record's canonical JSON (every column but the hash, keys
    sorted, no whitespace), chained through ``prev_hash``."""
    canonical = json.dumps({c: row[c] for c in _SORTED}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def entries_digest(ids: Iterable[int]) -> str:
    """SHA-256 of the erased ids, ascending, comma-separated: what a record says it erased."""
    return hashlib.sha256(",".join(str(i) for i in sorted(ids)).encode()).hexdigest()


def evidence_digest(conn: sqlite3.Connection, ids: Sequence[int], deliveries_upto: int) -> str:
    """SHA-256 of the evidence of entries ``ids`` and of their delivery attempts, as they are: erasure
    leaves the evidence as it was, and the record that commits to it keeps it checkable where the
    entry's own hash no longer can be (entries written before keyed commitments; the attempts, whose
    hash covers the app's erased answer) -- the attempts recorded by the time of the erasure
    (``deliveries_upto``), since a later one is chained and hashed as any other."""
    marks = ", ".join("?" * len(ids))
    entries = conn.execute(
        f"SELECT {', '.join(EVIDENCE)} FROM audit_log WHERE id IN ({marks}) ORDER BY id", list(ids)
    ).fetchall()
    attempts = conn.execute(
        f"SELECT {', '.join(DELIVERY_EVIDENCE)} FROM deliveries WHERE audit_id IN ({marks}) AND id <= ? "
        "ORDER BY id",
        [*ids, deliveries_upto],
    ).fetchall()
    canonical = json.dumps([entries, attempts], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def selector_digest(key: bytes, kind: str, value: str) -> str:
    """A keyed digest of the selector (never the value): with the key, the operator can show which
    selector a record answered; without it, nobody can confirm a guess."""
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def erase_batch(
    conn: sqlite3.Connection,
    ids: Sequence[int],
    cause: str,
    reason: str,
    selector: str | None,
    now: str,
) -> Erasure | None:
    """Erase the content of entries ``ids`` (not yet erased; at most :data:`BATCH`) in one transaction
    on the autocommit connection ``conn``; None when every one was erased meanwhile."""
    if cause not in CAUSES:
        raise ValueError(f"unknown cause {cause!r}")
    with transaction(conn):
        rows = _live_rows(conn, ids)
        if not rows:
            return None
        erased = sorted(r["id"] for r in rows)
        effects = [(r["id"], redaction.effects(r["callback_command"], r["request_body"])) for r in rows]
        record = insert_record(conn, effects, cause, reason, selector, now)
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


def insert_record(
    conn: sqlite3.Connection,
    entries: Sequence[tuple[int, str | None]],
    cause: str,
    reason: str,
    selector: str | None,
    now: str,
) -> Erasure:
    """Append the record of erasing ``entries`` ((id, effects), ascending) and list them under it, in the
    caller's transaction; the entries' evidence must already be in the table."""
    head = conn.execute("SELECT id, entry_hash FROM erasures ORDER BY id DESC LIMIT 1").fetchone()
    head_id, head_hash = head if head is not None else (0, GENESIS)
    erased = [entry_id for entry_id, _ in entries]
    upto = int(conn.execute("SELECT coalesce(max(id), 0) FROM deliveries").fetchone()[0])
    record: dict[str, Any] = {
        "id": head_id + 1,
        "erased_at": now,
        "cause": cause,
        "reason": reason,
        "selector_digest": selector,
        "first_id": erased[0],
        "last_id": erased[-1],
        "entries": len(erased),
        "entries_digest": entries_digest(erased),
        "evidence_digest": evidence_digest(conn, erased, upto),
        "deliveries_upto": upto,
        "prev_hash": head_hash,
    }
    record["entry_hash"] = record_hash(record)
    conn.execute(
        f"INSERT INTO erasures ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
        [record[c] for c in COLUMNS],
    )
    conn.executemany(
        "INSERT INTO erased_entries (entry_id, erasure_id, effects) VALUES (?, ?, ?)",
        [(entry_id, record["id"], effects) for entry_id, effects in entries],
    )
    return Erasure(record["id"], erased[0], erased[-1], len(erased), record["entry_hash"])


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
    conn.executemany(
        "INSERT INTO audit_log_fts (audit_log_fts, rowid, request_body, detail) VALUES ('delete', ?, ?, ?)",
        held,
    )
    return bool(held)


def purge(conn: sqlite3.Connection, merge: bool = True, attempts: int = 200) -> bool:
    """Leave no copy of erased values in the database files: merge the full-text indexes into one segment
    each (deleted terms go with the merged-away segments), zero freed pages, and checkpoint the WAL into
    the database, then truncate it. Returns False when a step could not finish (the merge did not settle
    within :data:`MERGE_STEPS` steps while others write, or a reader -- Litestream -- kept the WAL): the
    caller says so instead of promising that no copy remains."""
    conn.execute("PRAGMA secure_delete=ON")
    complete = True
    for table in INDEXES if merge else ():
        complete = _merged(conn, table) and complete
    wipe_freelist(conn)  # last: what the merges freed too
    for _ in range(attempts):
        if truncate_wal(conn):
            return complete
        time.sleep(0.05)
    return False


MERGE_STEPS: Final = 2000
"""Most merge steps of one index in one purge: each step is a short transaction, and under a steady
load new segments keep arriving, so the loop is bounded."""


def _merged(conn: sqlite3.Connection, table: str) -> bool:
    return any(merge_step(conn, table) for _ in range(MERGE_STEPS))


INDEXES: Final = ("audit_log_fts", "topics_fts")


def merge_step(conn: sqlite3.Connection, table: str, pages: int = 500) -> bool:
    """One step of merging ``table`` into a single segment (one short transaction); True once done."""
    with transaction(conn):
        before = conn.total_changes
        conn.execute(f"INSERT INTO {table} ({table}, rank) VALUES ('merge', ?)", (-pages,))
        return conn.total_changes - before < 2


def truncate_wal(conn: sqlite3.Connection) -> bool:
    """Checkpoint the whole WAL into the database and truncate it; False while a reader holds an older
    snapshot (try again)."""
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return not busy


def connect(path: Any) -> sqlite3.Connection:
    """A write connection for erasing: freed space and pages are overwritten with zeros."""
    from topic_audit.database import connect as write_connection

    conn = write_connection(path)
    conn.execute("PRAGMA secure_delete=ON")
    return conn


def wipe_freelist(conn: sqlite3.Connection) -> None:
    """Overwrite every page on the freelist with zeros: pages freed before erasure (by connections that
    did not zero what they freed) may still hold copies of erased values. Fills the freelist with a
    scratch table of zero blobs, then drops it (with ``secure_delete`` its pages are zeroed again)."""
    page = int(conn.execute("PRAGMA page_size").fetchone()[0])
    with transaction(conn):
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        if not free:
            return
        conn.execute("CREATE TABLE erasure_scratch (b BLOB)")
        while free:
            conn.executemany(
                "INSERT INTO erasure_scratch VALUES (zeroblob(?))", [(page * 8,)] * (free // 8 + 1)
            )
            free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        conn.execute("DROP TABLE erasure_scratch")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one ``erase`` or ``retain`` run did."""

    records: list[Erasure]
    purged: bool = True
    """Whether the purge completed (see :func:`purge`)."""

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
) -> Outcome:
    """Erase ``ids`` in records of at most ``batch`` entries (``pause`` seconds between them, so that
    another writer gets the lock), then :func:`purge` the files. ``on_erased`` is told each record's
    entries as it commits."""
    records = []
    for start in range(0, len(ids), batch):
        if start and pause:
            time.sleep(pause)
        done = erase_batch(conn, ids[start : start + batch], cause, reason, selector, now)
        if done is not None:
            records.append(done)
            if on_erased is not None:
                on_erased(done.entries)
    purged = purge(conn, merge=any(r.indexed for r in records)) if records else True
    return Outcome(records, purged)


def retain(
    conn: sqlite3.Connection,
    older_than: timedelta,
    now: str,
    batch: int = BATCH,
    pause: float = 0.0,
    on_erased: Callable[[int], None] | None = None,
) -> Outcome:
    """Erase the content of every entry received more than ``older_than`` ago (cause ``retention``)."""
    before = subjects.horizon(older_than)
    ids = list(subjects.select(conn, subjects.Selector("older", before)))
    reason = f"retention: older than {_age(older_than)} (received before {before})"
    return erase(conn, ids, "retention", reason, None, now, batch, pause, on_erased)


def _age(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and not seconds % size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def selector_key(signing_key: Ed25519PrivateKey) -> bytes:
    """The key of :func:`selector_digest`, derived from the checkpoint signing key."""
    raw = signing_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return hmac.new(raw, b"topic-audit erasure selectors", hashlib.sha256).digest()


POLICY_REASON: Final = (
    "TOPIC_AUDIT_STORE_BODIES=topics: callbacks outside the topic family keep evidence only"
)


def record_policy(conn: sqlite3.Connection, ids: Sequence[int], now: str) -> Erasure | None:
    """The record of entries written without their content (``TOPIC_AUDIT_STORE_BODIES=topics``), in
    the transaction that appends them."""
    if not ids:
        return None
    return insert_record(conn, [(i, None) for i in ids], "policy", POLICY_REASON, None, now)
