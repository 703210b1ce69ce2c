"""Tamper detection, once: the checks that ``verify``, ``watch`` and ``restore`` run on a log.

A :class:`Checker` holds one resumable object per kind of check (:class:`~.findings.Check`): the entries'
hash chain (:mod:`.entries`), the deliveries' chain (:mod:`.deliveries`) and the signed checkpoints
(:mod:`.checkpoints`: file, table, and what each line signs) and the Merkle tree their notes sign
(:mod:`.tree`: recomputed, and each note consistent with the last one seen). Each reports :class:`Finding` objects, the
first of each kind in log order, and remembers how far it got:

- ``verify`` makes a fresh checker and calls :meth:`Checker.advance` once: everything, from the start;
- ``watch`` keeps one and calls :meth:`~Checker.advance` each round (what was added since, chained on to
  what was verified; what was verified must still be there) and :meth:`~Checker.sweep` (a slice of what
  was verified, again, as a pass from the start would find it);
- ``restore`` checks each checkpoint it recovers from a restored copy's table as the next line after the
  published ones (:meth:`.checkpoints.Checkpoints.recover`), and keeps it only if nothing is found.

A fresh checker's first round is therefore exactly what ``verify`` reports, and a sweep over an old part
finds what ``verify`` finds there (``tests/test_integrity.py`` runs every tampering case through all three).

Adding a check:

- over a table or a file of its own (erasure records, say): a class with ``advance`` and ``sweep`` in a
  module of this package, added to ``Checker.checks`` below; read everything through the
  :class:`~.findings.Snapshot` (one read transaction) and report with :class:`~.findings.Notes`;
- of what a checkpoint signs (a Merkle tree root, a signed note): a function added to
  :data:`.checkpoints.LINE_CHECKS`; it then runs on every line ``verify`` reads, on every new and swept
  line in ``watch``, and on every line ``restore`` would recover.

Name the new finding's ``check`` in :class:`Finding`'s docstring and in docs/log-format.md ("What verify finds").
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from topic_audit.integrity.checkpoints import Checkpoints
from topic_audit.integrity.deliveries import Deliveries
from topic_audit.integrity.entries import ChainRunner, Entries
from topic_audit.integrity.erasures import Erasures
from topic_audit.integrity.findings import Check, Finding, Snapshot, first_bad_id
from topic_audit.integrity.tree import Tree
from topic_audit.transparency.checkpoints import read_file


class Checker:
    """The checks of a log, in the order their findings are reported. ``verify`` makes one and calls
    :meth:`advance` once; ``watch`` keeps one and calls :meth:`advance` and :meth:`sweep` every round."""

    def __init__(
        self, checkpoint_file: Path, pinned_key: str | None = None, run: ChainRunner | None = None
    ) -> None:
        self.checkpoint_file = checkpoint_file
        self.entries = Entries(run) if run is not None else Entries()
        self.deliveries = Deliveries()
        self.checkpoints = Checkpoints(pinned_key)
        self.tree = Tree()
        self.erasures = Erasures(pinned_key)
        self.checks: tuple[Check, ...] = (
            self.entries,
            self.deliveries,
            self.erasures,
            self.checkpoints,
            self.tree,
        )
        """A new check is added here, and nowhere else: ``verify`` and ``watch`` then run it."""

    @contextmanager
    def snapshot(self, conn: sqlite3.Connection) -> Iterator[Snapshot]:
        """``conn`` inside one read transaction, the checkpoint file read just before it began: every
        line read signs entries already in the snapshot, whatever is appended meanwhile."""
        try:
            lines, error = read_file(self.checkpoint_file), None
        except ValueError as exc:
            lines, error = [], str(exc)
        began = not conn.in_transaction
        if began:
            conn.execute("BEGIN")
        try:
            yield Snapshot(conn, self.checkpoint_file, lines, error)
        finally:
            if began and conn.in_transaction:
                conn.execute("ROLLBACK")

    def advance(self, snapshot: Snapshot) -> list[Finding]:
        """Everything added since the last call (all of it on the first), each check's findings in turn."""
        return [finding for check in self.checks for finding in check.advance(snapshot)]

    def sweep(self, snapshot: Snapshot, budget: int) -> list[Finding]:
        """Up to ``budget`` items of each check verified before, again."""
        return [finding for check in self.checks for finding in check.sweep(snapshot, budget)]


__all__ = ["Checker", "Finding", "Snapshot", "first_bad_id"]
