"""The signer signs only what it has checked: a witness inside our own process.

A checkpoint signs the log's head, the heads of ``deliveries`` and ``erasures``, the log's fixed
boundaries (``log_facts``) and the tree. Someone with write access to the database but not the key can
append what looks like a record of ours (an erasure that blanks an entry and hides an edit to its
evidence, say); were the next checkpoint to sign it, the forgery would carry our signature. So before
signing, :class:`Vetting` verifies everything added since the last checkpoint -- the new entries'
chain, hashes and commitments, the new deliveries, each new erasure record (its chain, its signature
under our key, and the entries it lists, checked again), the boundaries where the log says they must be
and unchanged since signed (again under the lock), and the tree: the
stored tiles still give the last signed root and, extended by the new entries, the root about to be
signed. Most of that runs before the write lock is taken; what arrived meanwhile is checked under it,
just before signing (:func:`checkpoint`). A log without a checkpoint file that was signed before (its
tree is stored) is not signed afresh: a new chain would hide what changed. Any finding refuses the
checkpoint (:class:`Refused`):
``serve`` keeps answering and logs the findings at each tick, signing nothing more; ``topic-audit
checkpoint`` exits non-zero.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from topic_audit.integrity import deliveries as delivery_chain
from topic_audit.integrity import entries as entry_chain
from topic_audit.integrity import erasures as erasure_chain
from topic_audit.integrity.findings import Finding
from topic_audit.log import chain
from topic_audit.privacy import records
from topic_audit.transparency import checkpoints, note, tlog, tree
from topic_audit.transparency.checkpoints import Signer


class Refused(RuntimeError):
    """What the signer would have signed does not verify: no checkpoint was signed."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        shown = "; ".join(f"{f.check}: {f.message}" for f in findings[:5])
        more = f" (and {len(findings) - 5} more)" if len(findings) > 5 else ""
        super().__init__(f"refusing to sign a checkpoint: {shown}{more} (`topic-audit verify` shows all)")


def _head(conn: sqlite3.Connection, table: str) -> tuple[int, str]:
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone() is None:
        return 0, chain.GENESIS
    row = conn.execute(f"SELECT id, entry_hash FROM {table} ORDER BY id DESC LIMIT 1").fetchone()
    return (int(row[0]), str(row[1])) if row is not None else (0, chain.GENESIS)


def last_signed(conn: sqlite3.Connection, file: Path) -> dict[str, Any] | None:
    """The last checkpoint: the file's last line (what auditors hold), else the table's last row."""
    lines = checkpoints.read_file(file)
    if lines:
        return lines[-1]
    cursor = conn.execute("SELECT * FROM checkpoints ORDER BY id DESC LIMIT 1")
    row = cursor.fetchone()
    return None if row is None else dict(zip([d[0] for d in cursor.description], row, strict=True))


def _listed_entries(conn: sqlite3.Connection, record: int) -> list[Finding]:
    """The entries an erasure record lists, each checked as a pass over the log would (its link to the
    entry before, its hash over evidence and commitment): work in the entries listed, not in the span
    of ids they cover."""
    ids = [
        i
        for (i,) in conn.execute(
            "SELECT entry_id FROM erased_entries WHERE erasure_id = ? ORDER BY entry_id", (record,)
        )
    ]
    found: list[Finding] = []
    start = 0
    while start < len(ids):  # contiguous runs, one range each
        end = start
        while end + 1 < len(ids) and ids[end + 1] == ids[end] + 1:
            end += 1
        found += entry_chain.verify_chain(conn, ids=(ids[start] - 1, ids[end]))[0]
        start = end + 1
    return found


def history_without_checkpoints(conn: sqlite3.Connection) -> str | None:
    """Why a log with no checkpoint looks signed before (its stored tree, or checkpoints in its table):
    then its checkpoint file was lost or removed, and a new chain of checkpoints would hide whatever
    changed since the last one."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'tree_hashes'").fetchone() is None:
        return None
    if conn.execute("SELECT 1 FROM tree_hashes LIMIT 1").fetchone() is not None:
        return "its Merkle tree is stored (only signing a checkpoint stores it)"
    if conn.execute("SELECT 1 FROM checkpoints LIMIT 1").fetchone() is not None:
        return "its checkpoints table holds checkpoints"
    return None


def boundaries_unsigned(conn: sqlite3.Connection, file: Path) -> bool:
    """Whether the log has boundaries (``log_facts``) that no checkpoint has signed yet: until one
    does, only their plausibility (:func:`~topic_audit.integrity.erasures.boundaries`) guards them, so
    ``serve`` signs one as soon as it starts."""
    if not checkpoints.facts(conn):
        return False
    last = last_signed(conn, file)
    return last is None or last.get("commitments_from") is None


LEAVES_AT_ONCE = tree.CHUNK
"""Leaf hashes read at once while the tree is extended to the head: the signer's memory stays the same
however much a checkpoint covers (a minute's at 6,000 callbacks a second, 360,000 leaves, took ~87 MB at
once, their rows and digests; a window takes ~16 MB)."""


class Vetting:
    """What has been verified since the last checkpoint, advanced in two steps (before and under the
    write lock), each from where the last one stopped."""

    def __init__(self, public_key_hex: str, last: dict[str, Any] | None) -> None:
        self.key = public_key_hex
        self.last = last or {}
        self.log = (int(self.last.get("log_size") or 0), str(self.last.get("head_hash") or chain.GENESIS))
        self.deliveries = self._signed("deliveries")
        self.erasures = self._signed("erasures")
        self.frontier: tlog.Frontier | None = None
        self.started = False

    def _signed(self, table: str) -> tuple[int, str]:
        size = self.last.get(f"{table}_size")
        return (int(size), str(self.last[f"{table}_head"])) if size else (0, chain.GENESIS)

    def advance(self, conn: sqlite3.Connection) -> list[Finding]:
        """Verify what was added since the last call (since the last checkpoint, on the first)."""
        found: list[Finding] = []
        if not self.started:
            self.started = True
            if self.last and not checkpoints.signature_ok(self.last):
                found.append(
                    Finding("checkpoint_signature", None, "the last checkpoint's signature is invalid")
                )
            elif self.last and self.last.get("public_key") != self.key:
                found.append(Finding("checkpoint_key", None, "the last checkpoint is not signed by this key"))
        found += self._facts(conn)  # every pass: a change between the two is caught under the lock
        found += self._entries(conn)
        found += self._chain(conn, "deliveries", delivery_chain.chain_range)
        erasures_before = self.erasures[0]
        found += self._chain(conn, "erasures", erasure_chain.chain_range)
        found += self._new_records(conn, erasures_before)
        found += self._tree(conn)
        return sorted(found, key=lambda f: f.entry_id or 0)

    def _facts(self, conn: sqlite3.Connection) -> list[Finding]:
        """The boundaries are where the log says they must be, and still what the last checkpoint
        signed, if it signed them."""
        found = erasure_chain.boundaries(conn)
        stored = checkpoints.facts(conn)
        for name in checkpoints.FACT_FIELDS:
            signed = self.last.get(name)
            if signed is not None and stored.get(name) != signed:
                message = f"log_facts.{name} is {stored.get(name)}; the last checkpoint signed {signed}"
                found.append(Finding("log_facts", None, message))
        return found

    def _entries(self, conn: sqlite3.Connection) -> list[Finding]:
        size, signed_hash = self.log
        head = _head(conn, "audit_log")[0]
        if head < size:
            return [Finding("ids", head + 1, f"the log has {head} entries; {size} were signed")]
        if size:
            row = conn.execute("SELECT entry_hash FROM audit_log WHERE id = ?", (size,)).fetchone()
            if row is None or row[0] != signed_hash:
                return [Finding("chain", size, f"entry {size} is no longer the one signed")]
        if head == size:
            return []
        found, _, head_hash = entry_chain.verify_chain(conn, ids=(size, head) if size else entry_chain.ALL)
        self.log = (head, head_hash)
        return found

    def _chain(self, conn: sqlite3.Connection, table: str, check: Any) -> list[Finding]:
        size, signed_hash = getattr(self, table)
        head = _head(conn, table)[0]
        if head < size:
            return [Finding(f"checkpoint_{table}", None, f"{table} has {head} rows; {size} were signed")]
        if size:
            row = conn.execute(f"SELECT entry_hash FROM {table} WHERE id = ?", (size,)).fetchone()
            if row is None or row[0] != signed_hash:
                return [Finding(f"checkpoint_{table}", None, f"{table} {size} is no longer the one signed")]
        if head == size:
            return []
        found, _, head_hash = check(conn, (size, head), signed_hash)
        setattr(self, table, (head, head_hash))
        return list(found)

    def _new_records(self, conn: sqlite3.Connection, after: int) -> list[Finding]:
        """Each erasure record since the last checkpoint carries our signature (from the boundary on),
        and the entries it lists still verify as erased entries."""
        found: list[Finding] = []
        first_signed = checkpoints.facts(conn).get("signed_erasures_from")
        rows = conn.execute(
            "SELECT * FROM erasures WHERE id > ? AND id <= ? ORDER BY id", (after, self.erasures[0])
        )
        names = [d[0] for d in rows.description]
        for values in rows.fetchall():
            record = dict(zip(names, values, strict=True))
            needs = first_signed is not None and int(record["id"]) >= first_signed
            if needs and not records.signature_ok(
                self.key, str(record["entry_hash"]), record.get("signature")
            ):
                message = f"erasure {record['id']} does not carry this log's signature (forged, or written without the key)"
                first = record["first_id"] if isinstance(record["first_id"], int) else None
                found.append(Finding("erasure_signature", first, message))
            found += _listed_entries(conn, int(record["id"]))
        return found

    def _tree(self, conn: sqlite3.Connection) -> list[Finding]:
        """The tree the note will sign extends the last signed one over exactly the log's entries."""
        head = _head(conn, "audit_log")[0]
        if self.frontier is None:
            self.frontier, found = self._signed_frontier(conn)
            if found:
                return found
        for start in range(self.frontier.size, head, LEAVES_AT_ONCE):
            self.frontier.extend(tree.leaf_hashes(conn, start, min(start + LEAVES_AT_ONCE, head)))
        if head and tree.root(conn, head) != self.frontier.root():
            return [Finding("tree_hashes", None, "the stored tree does not match the log's entries")]
        return []

    def _signed_frontier(self, conn: sqlite3.Connection) -> tuple[tlog.Frontier, list[Finding]]:
        """The compact range of the last signed tree, read from the stored tiles and checked against the
        root its note signs (from scratch when there is none)."""
        frontier = tlog.Frontier()
        text = self.last.get("note")
        if not text or not self.log[0]:
            return frontier, []
        origin = str(text).split("\n", 1)[0]
        try:
            verifier = note.Verifier.for_key(origin, bytes.fromhex(self.key))
            signed = note.Checkpoint.parse(note.open_note(str(text), verifier))
        except (note.NoteError, ValueError) as exc:
            return frontier, [Finding("checkpoint_note", None, f"the last checkpoint's note: {exc}")]
        stored = tree.StoredTree(conn, signed.size)
        offset = 0
        for height in reversed(range(signed.size.bit_length())):
            if signed.size >> height & 1:
                frontier.push(stored.subtree(height, offset >> height), height)
                offset += 1 << height
        if frontier.root() != signed.root:
            message = f"the stored tree no longer gives the root signed at size {signed.size}"
            return tlog.Frontier(), [Finding("tree_hashes", None, message)]
        return frontier, []


def checkpoint(
    conn: sqlite3.Connection, signer: Signer, file: Path, created_at: str, origin: str | None = None
) -> dict[str, Any]:
    """Verify everything since the last checkpoint, then sign the head (what arrived while verifying is
    verified under the write lock, just before signing). Raises :class:`Refused` and signs nothing when
    anything does not verify."""
    checkpoints.drop_partial_line(file)  # a crash while appending left half a line: not a checkpoint
    last = last_signed(conn, file)
    if last is None and (why := history_without_checkpoints(conn)) is not None:
        message = (
            f"{file} holds no checkpoint, but this log was signed before ({why}): restore the checkpoint "
            "file (it is published beside the replica) rather than start a new chain over what changed"
        )
        raise Refused([Finding("checkpoint_file", None, message)])
    tree.update(conn)  # the tiles the note will sign, stored outside the lock (and checked below)
    vetting = Vetting(signer.public_key_hex, last)
    found = vetting.advance(conn)
    if found:
        raise Refused(found)

    def under_lock(locked: sqlite3.Connection) -> None:
        if late := vetting.advance(locked):
            raise Refused(late)

    return checkpoints.make_checkpoint(conn, signer, file, created_at, origin, check=under_lock)
