"""The ``deliveries`` chain (forwarding): contiguous ids, links and hashes, resumed from the last verified
delivery and swept like the entries. Findings name the delivery in the message (``entry_id`` is for
audit_log entries)."""

from __future__ import annotations

import hashlib
import sqlite3

from topic_audit.forwarding import outbox
from topic_audit.integrity.findings import Finding, Notes, Snapshot
from topic_audit.log import chain

_READ = f"SELECT {', '.join(outbox.SORTED)}, entry_hash FROM deliveries WHERE id > ? AND id <= ? ORDER BY id"
_ID, _PREV = outbox.SORTED.index("id"), outbox.SORTED.index("prev_hash")
_AUDIT_ID, _ANSWER, _DETAIL = (outbox.SORTED.index(c) for c in ("audit_id", "response_body", "detail"))


def _erased(conn: sqlite3.Connection, row: tuple[object, ...]) -> bool:
    """An attempt of an erased entry, its app's answer erased: its own hash covered that answer, so its
    evidence is checked against the erasure record instead (:mod:`.erasures`)."""
    if row[_ANSWER] is not None or row[_DETAIL] is not None:
        return False
    query = "SELECT 1 FROM sqlite_master WHERE name = 'erased_entries'"
    if conn.execute(query).fetchone() is None:
        return False
    return (
        conn.execute("SELECT 1 FROM erased_entries WHERE entry_id = ?", (row[_AUDIT_ID],)).fetchone()
        is not None
    )


def chain_range(
    conn: sqlite3.Connection, ids: tuple[int, int], after: str | None = None
) -> tuple[list[Finding], int, str]:
    """The deliveries with ``ids[0] < id <= ids[1]``, the first linking to ``after`` (the hash of
    delivery ``ids[0]``; read from the table when None): (findings, deliveries, last hash)."""
    note = Notes()
    if after is None:
        row = conn.execute("SELECT entry_hash FROM deliveries WHERE id = ?", (ids[0],)).fetchone()
        after = row[0] if row is not None else chain.GENESIS
    expected, prev, count = ids[0] + 1, after, 0
    for row in conn.execute(_READ, ids):
        count += 1
        delivery = row[_ID]
        if delivery != expected:
            note("delivery_ids", None, f"delivery {expected}: expected delivery {expected}, found {delivery}")
        if row[_PREV] != prev:
            note("delivery_chain", None, f"delivery {delivery}: prev_hash is not the previous delivery's")
        if hashlib.sha256(outbox.canonical(row[:-1])).hexdigest() != row[-1] and not _erased(conn, row):
            note(
                "delivery_hash",
                None,
                f"delivery {delivery}: entry_hash does not match the delivery's canonical form",
            )
        prev, expected = row[-1], delivery + 1
    return note.findings(), count, prev


class Deliveries:
    """The deliveries chain, resumed from the last verified delivery (remembered: deliveries removed or
    rewritten behind it are found at once), and a rolling sweep over what earlier rounds verified.

    Another chained table (``erasures``) is checked the same way by a subclass that names its table, its
    findings and its range check."""

    table, noun, prefix = "deliveries", "delivery", "delivery"
    rows_per_budget = 1
    """Rows swept per unit of the sweep's budget (entries): 1 for deliveries."""

    def __init__(self) -> None:
        self.verified: tuple[int, str] = (0, chain.GENESIS)
        """The last row verified (id, entry_hash)."""
        self.appended = 0
        """Rows checked by the last :meth:`advance`."""
        self.cursor = 0

    def check_range(
        self, conn: sqlite3.Connection, ids: tuple[int, int], after: str | None = None
    ) -> tuple[list[Finding], int, str]:
        return chain_range(conn, ids, after)

    def extra(self, conn: sqlite3.Connection) -> list[Finding]:
        """Findings about the table as a whole, every round (none for deliveries)."""
        return []

    def advance(self, snapshot: Snapshot) -> list[Finding]:
        self.appended = 0
        if not snapshot.has(self.table):
            return []
        conn, (last_id, last_hash) = snapshot.conn, self.verified
        head = snapshot.last_id(self.table)
        if head < last_id:
            message = f"{self.table} has {head}; {last_id} were verified: {self.table} removed"
            return [Finding(f"{self.prefix}_ids", None, message)]
        found = self.extra(conn)
        if last_id:
            stored = conn.execute(f"SELECT entry_hash FROM {self.table} WHERE id = ?", (last_id,)).fetchone()
            if stored is None or stored[0] != last_hash:
                message = f"{self.noun} {last_id} is no longer the one verified"
                found.append(Finding(f"{self.prefix}_chain", None, message))
        if head > last_id:
            chained, self.appended, head_hash = self.check_range(conn, (last_id, head), last_hash)
            found += chained
            self.verified = (head, head_hash)
        return found

    def sweep(self, snapshot: Snapshot, budget: int) -> list[Finding]:
        limit = min(self.verified[0], snapshot.last_id(self.table)) if snapshot.has(self.table) else 0
        if not limit:
            return []
        start = self.cursor if self.cursor < limit else 0
        end = min(start + max(budget // self.rows_per_budget, 1), limit)
        self.cursor = end if end < limit else 0
        return self.check_range(snapshot.conn, (start, end))[0]
