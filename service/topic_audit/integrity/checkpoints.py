"""The signed checkpoints: each line of the checkpoint file (signature, signer, chain of digests, and
what it signs still in the log), the ``checkpoints`` table against the file, and the lines checked in
earlier rounds still there, unchanged.

What a line says about the log is checked by the functions in :data:`LINE_CHECKS`, in order, with the
state of the pass over the lines (:class:`Lines`); ``verify``, ``watch`` and ``restore`` (for the lines it
recovers from a restored copy's table) all check a line with :meth:`Lines.check`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from topic_audit.integrity.findings import Finding, Notes, Snapshot
from topic_audit.log import chain
from topic_audit.transparency.checkpoints import FACT_FIELDS, facts, read_file, signature_ok


@dataclass
class Lines:
    """A pass over checkpoint lines, in order: how far it got and what the lines so far established."""

    key: str | None
    """The signer: pinned, else the first line's."""
    number: int = 0
    """The last line checked (lines count from 1)."""
    prev_digest: str = chain.GENESIS
    """The digest of the last line with a valid signature."""
    matched: int = 0
    """The size of the last line whose head the log still holds, before any that it does not."""
    broken: bool = False
    """A line's head is no longer in the log: later lines say nothing more about where it changed."""

    def check(self, snapshot: Snapshot, cp: dict[str, Any], note: Notes) -> None:
        """One line, the next one: signature and digest (a line without them says nothing), signer,
        link to the previous line, then :data:`LINE_CHECKS`."""
        self.number += 1
        if not signature_ok(cp):
            note("checkpoint_signature", None, f"checkpoint {self.number}: signature or digest invalid")
            return
        size = int(cp["log_size"])
        self.key = self.key or cp["public_key"]
        if cp["public_key"] != self.key:
            note(
                "checkpoint_key",
                size,
                f"checkpoint {self.number}: signed by another key ({cp['public_key'][:16]}…)",
            )
        if cp["prev_digest"] != self.prev_digest:
            note(
                "checkpoint_chain",
                size,
                f"checkpoint {self.number}: prev_digest is not the previous checkpoint's",
            )
        self.prev_digest = cp["digest"]
        for line_check in LINE_CHECKS:
            if not line_check(snapshot, self, cp, note):
                break


LineCheck = Callable[[Snapshot, Lines, dict[str, Any], Notes], bool]
"""A check of what a line with a valid signature says about the log; False: the later ones say nothing."""


def log_prefix(snapshot: Snapshot, lines: Lines, cp: dict[str, Any], note: Notes) -> bool:
    """The log still holds the entries the line signs, ending in its head.

    The log's size is its highest id, not its row count: a tail cut short is reported at its first
    missing id, and entries missing elsewhere (a cut prefix, a deleted row) are the chain's findings at
    the entry where they are missing, not a cut tail. A head no longer in the log is reported at the first
    entry after the last line that still matches, because the chain may have been rewritten consistently
    from any entry after it: that first entry is the earliest that may be bad, and ``first_bad_id`` must
    not point past the altered entry (``watch`` used to say the line's size).
    """
    size, head = int(cp["log_size"]), snapshot.last_id("audit_log")
    if size > head:
        lines.broken = True
        message = f"checkpoint {lines.number} covers {size} entries but the log has {head}: entries removed"
        note("checkpoint_prefix", head + 1, message)
        return False
    if size == 0:
        return True
    row = snapshot.conn.execute("SELECT entry_hash FROM audit_log WHERE id = ?", (size,)).fetchone()
    if row is None or row[0] != cp["head_hash"]:
        lines.broken = True
        first = lines.matched + 1
        message = (
            f"checkpoint {lines.number}: entry {size} is not the signed head; the log was altered in "
            f"entries {first}..{size}"
        )
        note("checkpoint_prefix", first, message)
    elif not lines.broken:
        lines.matched = size
    return True


def _signed_head(table: str, what: str, check: str) -> LineCheck:
    """Since ``table`` exists, a line signs its head too (``<table>_size``, ``<table>_head``): rows
    removed are told from rows altered."""

    def signed_head(snapshot: Snapshot, lines: Lines, cp: dict[str, Any], note: Notes) -> bool:
        if not cp.get(f"{table}_size"):
            return True
        size, stored = int(cp[f"{table}_size"]), snapshot.last_id(table)
        if size > stored:
            message = (
                f"checkpoint {lines.number} covers {size} {what} but {table} has {stored}: {what} removed"
            )
            note(check, None, message)
            return True
        row = snapshot.conn.execute(f"SELECT entry_hash FROM {table} WHERE id = ?", (size,)).fetchone()
        if row is None or row[0] != cp[f"{table}_head"]:
            note(
                check,
                None,
                f"checkpoint {lines.number}: {table} {size} is not the signed head; {table} was altered",
            )
        return True

    return signed_head


deliveries_head = _signed_head("deliveries", "deliveries", "checkpoint_deliveries")
erasures_head = _signed_head("erasures", "erasure records", "checkpoint_erasures")


def boundaries(snapshot: Snapshot, lines: Lines, cp: dict[str, Any], note: Notes) -> bool:
    """The log's fixed boundaries (``log_facts``) are still those the line signs: raising one would
    exempt a forged entry or erasure record from the rules that catch it."""
    stored = facts(snapshot.conn)
    for name in FACT_FIELDS:
        if cp.get(name) is not None and stored.get(name) != cp[name]:
            message = (
                f"checkpoint {lines.number} signs {name} = {cp[name]}; log_facts says {stored.get(name)}"
            )
            note("log_facts", None, message)
    return True


LINE_CHECKS: tuple[LineCheck, ...] = (log_prefix, deliveries_head, erasures_head, boundaries)


class Checkpoints:
    """The checkpoint file and table, resumed: new lines are checked on from the last one verified
    (remembered whole: a line edited in place, or lines removed, are found at once), and a rolling sweep
    checks the older lines again from the first."""

    def __init__(self, pinned_key: str | None = None) -> None:
        self.pinned_key = pinned_key
        self.lines = Lines(pinned_key)
        self.last: dict[str, Any] | None = None
        self.added = 0
        """Lines checked by the last :meth:`advance`."""
        self.table_seen = 0
        """Rows of the ``checkpoints`` table compared with the file."""
        self.swept = Lines(pinned_key)

    @property
    def seen(self) -> int:
        return self.lines.number

    def advance(self, snapshot: Snapshot) -> list[Finding]:
        note, lines, seen = Notes(), snapshot.lines, self.seen
        self.added = 0
        if snapshot.file_error is not None:
            note("checkpoint_file", None, f"{snapshot.file} is not a checkpoint file: {snapshot.file_error}")
        self._table(snapshot, note)
        if len(lines) < seen:
            note("checkpoint_file", None, f"{seen - len(lines)} checkpoints removed from the file")
            return note.findings()
        if seen and lines[seen - 1] != self.last:
            note("checkpoint_file", None, f"checkpoint {seen} was rewritten")
        for cp in lines[seen:]:
            self.lines.check(snapshot, cp, note)
        self.added, self.last = len(lines) - seen, lines[-1] if lines else None
        return note.findings()

    def _table(self, snapshot: Snapshot, note: Notes) -> None:
        """The table holds what the file holds. The table may lag the file by one line (a crash between
        the two writes), never lead it."""
        if not snapshot.has("checkpoints"):
            return
        conn, seen = snapshot.conn, self.table_seen
        total = conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0]
        stored = [
            r[0]
            for r in conn.execute("SELECT digest FROM checkpoints ORDER BY id LIMIT -1 OFFSET ?", (seen,))
        ]
        in_file = [c.get("digest") for c in snapshot.lines]
        if total > len(in_file) and snapshot.file_error is None:  # signed since: what the file then held
            in_file = [c.get("digest") for c in read_file(snapshot.file)][:total]
        if not in_file and total:
            note(
                "checkpoint_file",
                None,
                f"{snapshot.file} is missing but the database records {total} checkpoints",
            )
        if not 0 <= len(in_file) - total <= 1 or total < seen or stored != in_file[seen:total]:
            note("checkpoint_table", None, "the checkpoints table does not match the checkpoint file")
        self.table_seen = total

    def sweep(self, snapshot: Snapshot, budget: int) -> list[Finding]:
        """The next ``budget`` of the lines verified before, as a pass from the first line would find them."""
        note, limit = Notes(), min(self.seen, len(snapshot.lines))
        if self.swept.number >= limit:
            self.swept = Lines(self.pinned_key)
        start = self.swept.number
        for cp in snapshot.lines[start : min(start + budget, limit)]:
            self.swept.check(snapshot, cp, note)
        if snapshot.has("checkpoints"):
            stored = [
                r[0]
                for r in snapshot.conn.execute(
                    "SELECT digest FROM checkpoints ORDER BY id LIMIT ? OFFSET ?",
                    (self.swept.number - start, start),
                )
            ]
            if any(
                digest != cp.get("digest") for digest, cp in zip(stored, snapshot.lines[start:], strict=False)
            ):
                note("checkpoint_table", None, "the checkpoints table does not match the checkpoint file")
        return note.findings()

    def recover(
        self, snapshot: Snapshot, published: list[dict[str, Any]], rows: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], Finding | None]:
        """``restore``: the ``rows`` of a restored copy's table that follow the ``published`` lines, each
        checked as the next line, up to the first with a finding (returned with it). What the published
        lines themselves show is for ``verify`` to report."""
        for cp in published:
            self.lines.check(snapshot, cp, Notes())
        recovered: list[dict[str, Any]] = []
        for row in rows:
            note = Notes()
            self.lines.check(snapshot, row, note)
            if found := note.findings():
                return recovered, found[0]
            recovered.append(row)
        return recovered, None
