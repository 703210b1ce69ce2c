"""The ``erasures`` records: their chain, and that each says exactly what it erased.

Every record is chained like the deliveries (contiguous ids, ``prev_hash``, ``entry_hash`` over its
canonical form) and its head is signed in every checkpoint. Each record must match the entries listed
under it in ``erased_entries`` — their number, first and last id and the digest of their ids; the
evidence of those entries and of their delivery attempts must still be what it committed to
(``evidence_digest``); and so must what the projection replays in place of the erased topic events
(``effects_digest``; records written before ``m016`` have none, and their effects stay unchecked). An
erasure applied to more or fewer entries than recorded, a record edited or removed, evidence or effects
changed behind an erasure, is a finding. What an erased entry itself must look like (content blank, no
salt) is checked with the chain (:mod:`.entries`).
"""

from __future__ import annotations

import sqlite3

from topic_audit.integrity.deliveries import Deliveries
from topic_audit.integrity.findings import Finding, Notes, Snapshot
from topic_audit.log import chain
from topic_audit.privacy import erasure, records

_READ = "SELECT * FROM erasures WHERE id > ? AND id <= ? ORDER BY id"
"""Every column the table has: a log not yet migrated to ``m016`` has no ``effects_digest``."""
_LISTED = (
    "SELECT count(*), min(entry_id), max(entry_id), group_concat(entry_id) FROM "
    "(SELECT entry_id FROM erased_entries WHERE erasure_id = ? ORDER BY entry_id)"
)


def chain_range(
    conn: sqlite3.Connection, ids: tuple[int, int], after: str | None = None, key: str | None = None
) -> tuple[list[Finding], int, str]:
    """The records with ``ids[0] < id <= ids[1]``: (findings, records, last hash). With the log's public
    ``key`` (hex), each record from ``log_facts.signed_erasures_from`` on must carry its signature."""
    note = Notes()
    signed_from = _signed_from(conn) if key is not None else None
    if after is None:
        row = conn.execute("SELECT entry_hash FROM erasures WHERE id = ?", (ids[0],)).fetchone()
        after = row[0] if row is not None else chain.GENESIS
    expected, prev, count = ids[0] + 1, after, 0
    cursor = conn.execute(_READ, ids)
    names = [d[0] for d in cursor.description]
    for values in cursor:
        count += 1
        record = dict(zip(names, values, strict=True))
        number = record["id"]
        if number != expected:
            note("erasure_ids", None, f"erasure {expected}: expected erasure {expected}, found {number}")
        if record["prev_hash"] != prev:
            note("erasure_chain", None, f"erasure {number}: prev_hash is not the previous record's")
        if records.record_hash(record) != record["entry_hash"]:
            note("erasure_hash", None, f"erasure {number}: entry_hash does not match the record")
        if (
            key is not None
            and signed_from is not None
            and number >= signed_from
            and not records.signature_ok(key, str(record["entry_hash"]), record.get("signature"))
        ):
            first = record["first_id"] if isinstance(record["first_id"], int) else None
            message = f"erasure {number} is not signed by the log's key: not written by topic-audit"
            note("erasure_signature", first, message)
        _check_listed(conn, record, note)
        prev, expected = record["entry_hash"], number + 1
    return note.findings(), count, prev


def _signed_from(conn: sqlite3.Connection) -> int | None:
    """``log_facts.signed_erasures_from`` (None before ``m017``; 1 when the fact was removed)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'log_facts'").fetchone() is None:
        return None
    row = conn.execute("SELECT value FROM log_facts WHERE name = 'signed_erasures_from'").fetchone()
    return 1 if row is None else int(row[0])


def boundaries(conn: sqlite3.Connection) -> list[Finding]:
    """The log's boundaries (``log_facts``) are where the log says they must be, whether or not a
    checkpoint has signed them yet: no entry below ``commitments_from`` carries a commitment and no
    record below ``signed_erasures_from`` a signature (raising either would exempt a forgery), and
    neither lies past the end of its table."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'log_facts'").fetchone() is None:
        return []
    facts = dict(conn.execute("SELECT name, value FROM log_facts").fetchall())
    found = []
    keyed, signed = facts.get("commitments_from"), facts.get("signed_erasures_from")
    if keyed is not None:
        below = conn.execute(
            "SELECT id FROM audit_log WHERE id >= 1 AND id < ? AND content_commitment IS NOT NULL ORDER BY id LIMIT 1",
            (keyed,),
        ).fetchone()
        head = conn.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()[0]
        if below is not None or keyed > head + 1:
            message = f"log_facts.commitments_from is {keyed}, past the first entry with a commitment or the log's end"
            found.append(Finding("log_facts", below[0] if below is not None else None, message))
    if signed is not None:
        below = conn.execute(
            "SELECT id FROM erasures WHERE id < ? AND signature IS NOT NULL ORDER BY id LIMIT 1", (signed,)
        ).fetchone()
        head = conn.execute("SELECT coalesce(max(id), 0) FROM erasures").fetchone()[0]
        if below is not None or signed > head + 1:
            message = f"log_facts.signed_erasures_from is {signed}, past a signed record or the table's end"
            found.append(Finding("log_facts", None, message))
    return found


def _check_listed(conn: sqlite3.Connection, record: dict[str, object], note: Notes) -> None:
    count, first, last, listed = conn.execute(_LISTED, (record["id"],)).fetchone()
    ids = [int(i) for i in listed.split(",")] if listed else []
    said = (record["entries"], record["first_id"], record["last_id"], record["entries_digest"])
    if (count, first, last, records.entries_digest(ids)) != said:
        note(
            "erasure_entries",
            first if isinstance(first, int) else None,
            f"erasure {record['id']} records {record['entries']} entries "
            f"({record['first_id']}..{record['last_id']}); {count} are listed under it",
        )
    elif records.evidence_digest(conn, ids, int(str(record["deliveries_upto"]))) != record["evidence_digest"]:
        note(
            "erasure_evidence",
            first,
            f"erasure {record['id']}: the evidence of its entries or their deliveries changed since",
        )
    elif record.get("effects_digest") is not None and _effects(conn, record) != record["effects_digest"]:
        note(
            "erasure_effects",
            first,
            f"erasure {record['id']}: what the projection replays for its entries (effects) changed since",
        )


def _effects(conn: sqlite3.Connection, record: dict[str, object]) -> str:
    listed = conn.execute(
        "SELECT entry_id, effects FROM erased_entries WHERE erasure_id = ? ORDER BY entry_id", (record["id"],)
    )
    return records.effects_digest(listed.fetchall())


def orphans(conn: sqlite3.Connection) -> list[Finding]:
    """Entries listed as erased by a record that does not exist."""
    row = conn.execute(
        "SELECT min(entry_id), count(*) FROM erased_entries WHERE erasure_id NOT IN (SELECT id FROM erasures)"
    ).fetchone()
    if not row[1]:
        return []
    return [Finding("erasure_entries", row[0], f"{row[1]} entries are listed as erased by no record")]


class Erasures(Deliveries):
    """The erasure records, resumed and swept as the deliveries are (a record covers up to
    :data:`topic_audit.privacy.erasure.BATCH` entries, so the sweep takes fewer of them)."""

    table, noun, prefix = "erasures", "erasure", "erasure"
    rows_per_budget = erasure.BATCH

    def __init__(self, pinned_key: str | None = None) -> None:
        super().__init__()
        self.pinned_key = pinned_key
        self.key: str | None = pinned_key
        """The log's public key (hex): pinned, else the first checkpoint's; None: no signer yet."""

    def advance(self, snapshot: Snapshot) -> list[Finding]:
        self._learn_key(snapshot)
        return super().advance(snapshot)

    def sweep(self, snapshot: Snapshot, budget: int) -> list[Finding]:
        self._learn_key(snapshot)
        return super().sweep(snapshot, budget)

    def _learn_key(self, snapshot: Snapshot) -> None:
        if self.key is None and snapshot.lines and isinstance(snapshot.lines[0].get("public_key"), str):
            self.key = str(snapshot.lines[0]["public_key"])

    def check_range(
        self, conn: sqlite3.Connection, ids: tuple[int, int], after: str | None = None
    ) -> tuple[list[Finding], int, str]:
        return chain_range(conn, ids, after, self.key)

    def extra(self, conn: sqlite3.Connection) -> list[Finding]:
        return orphans(conn) + boundaries(conn)
