"""The Merkle tree the checkpoints' notes sign (:mod:`topic_audit.transparency.tree`): each note's form, signature and
origin; the tree recomputed from the log, compared with each note's root at its size and with the stored
tiles; and each new note shown consistent with the last one seen (a fork or a rewritten, re-signed
history fails that proof, whoever holds the key).

``verify`` checks every note against the one before it in the file; ``watch`` remembers the last note it
saw, so a history rewritten and re-signed between two rounds is found even if the file is replaced
whole: its note for a size already seen, or a later one, does not extend the remembered one.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from topic_audit.integrity.findings import Finding, Notes, Snapshot
from topic_audit.transparency import tlog, tree
from topic_audit.transparency.checkpoints import signature_ok
from topic_audit.transparency.note import Checkpoint, NoteError, Verifier, open_note

CHUNK = 1 << 16
"""Leaves read at a time."""


class Tree:
    """Resumed: the recomputed tree (a compact range) goes on from the last size reached, and the last
    note seen is kept for the next one's consistency proof. The sweep is the entries' check's."""

    def __init__(self) -> None:
        self.frontier = tlog.Frontier()
        self.last_text: str | None = None
        """The last note seen, whole."""
        self.last: tuple[int, int, bytes] | None = None
        """(line number, size, root) of the last note seen."""
        self.origin: str | None = None
        self.pending: list[tuple[int, int, bytes]] = []
        """Notes whose size the recomputed tree has not reached yet."""
        self.matched = 0
        """The size of the last note whose root the log's tree still gives."""
        self.checked: dict[int, int] = {}
        """Stored tiles checked, by level."""
        self.partial: list[bytes] = []
        """The leaves since the last multiple of 256, pushed one by one."""

    def advance(self, snapshot: Snapshot) -> list[Finding]:
        note = Notes()
        if not snapshot.has("tree_hashes"):
            return []
        lines = snapshot.lines
        for number, cp in enumerate(lines[self._first_new(lines) :], self._first_new(lines) + 1):
            if not self._signs_this_log(snapshot, cp):
                continue  # the checkpoints' own findings (signature, head) say what is wrong with it
            body = self._open(cp, number, note)
            if body is not None:
                self._consistent(snapshot.conn, number, body, note)
                self.last = (number, body.size, body.root)
                self.last_text = str(cp["note"])
                self.pending.append((number, body.size, body.root))
        self._recompute(snapshot, note)
        return note.findings()

    @staticmethod
    def _signs_this_log(snapshot: Snapshot, cp: dict[str, Any]) -> bool:
        """The line's own signature holds and the log still ends its first ``log_size`` entries in the
        line's head: only then does its note say something the checkpoints' checks do not."""
        if not signature_ok(cp):
            return False
        size = int(cp["log_size"])
        row = snapshot.conn.execute("SELECT entry_hash FROM audit_log WHERE id = ?", (size,)).fetchone()
        return size == 0 or (row is not None and row[0] == cp["head_hash"])

    def _first_new(self, lines: list[dict[str, Any]]) -> int:
        """Where the lines not seen yet begin: after the last note seen, or, when the file no longer
        holds it (rewritten), at the first line as large as it, so that its replacement is checked."""
        texts = [cp.get("note") for cp in lines]
        if self.last_text is None:
            return 0
        if self.last_text in texts:
            return len(texts) - texts[::-1].index(self.last_text)
        size = self.last[1] if self.last is not None else 0
        return next((i for i, cp in enumerate(lines) if int(cp.get("log_size") or 0) >= size), len(lines))

    def sweep(self, snapshot: Snapshot, budget: int) -> list[Finding]:
        return []

    def _open(self, cp: dict[str, object], number: int, note: Notes) -> Checkpoint | None:
        text = cp.get("note")
        if text is None:
            return None  # signed before the tree existed
        try:
            body = Checkpoint.parse(str(text)[: str(text).rfind("\n\n") + 1])
            key = bytes.fromhex(str(cp["public_key"]))
            open_note(str(text), Verifier.for_key(body.origin, key))
        except (NoteError, ValueError, KeyError) as exc:
            note("checkpoint_note", None, f"checkpoint {number}: its note does not hold: {exc}")
            return None
        if body.size != cp.get("log_size"):
            note(
                "checkpoint_note",
                None,
                f"checkpoint {number}: its note signs size {body.size}, the line {cp.get('log_size')}",
            )
            return None
        self.origin = self.origin or body.origin
        if body.origin != self.origin:
            note(
                "checkpoint_note",
                None,
                f"checkpoint {number}: origin {body.origin!r}, earlier ones {self.origin!r}",
            )
        return body

    def _consistent(self, conn: sqlite3.Connection, number: int, body: Checkpoint, note: Notes) -> None:
        if self.last is None or self.last[1] == 0:
            return
        old_number, old_size, old_root = self.last
        try:
            reader = tree.StoredTree(conn, body.size)
            if tlog.root(reader, body.size) != body.root:
                return  # the log is not what this note signs: the recomputed tree's finding
            proof = tlog.consistency_proof(reader, old_size, body.size)
        except LookupError:
            return  # the log lacks entries the note signs: the checkpoints' finding
        except ValueError:
            proof = None  # a note smaller than the one before
        if proof is None or not tlog.verify_consistency(old_size, body.size, old_root, body.root, proof):
            note(
                "checkpoint_consistency",
                None,
                f"checkpoint {number} (size {body.size}) does not extend checkpoint {old_number} (size "
                f"{old_size}) as the log now stands: it was forked or rewritten at or before entry {body.size}",
            )

    def _recompute(self, snapshot: Snapshot, note: Notes) -> None:
        """Stream the leaves up to the largest pending note's size, comparing roots and stored tiles."""
        self.pending.sort(key=lambda p: p[1])
        target = min(self.pending[-1][1] if self.pending else 0, snapshot.last_id("audit_log"))
        conn, frontier = snapshot.conn, self.frontier
        while frontier.size < target:
            stops = [p[1] for p in self.pending if frontier.size < p[1] <= target]
            end = min(frontier.size + CHUNK, stops[0] if stops else target)
            try:
                leaves = tree.leaf_hashes(conn, frontier.size, end)
            except LookupError:
                return  # entries missing: the chain's and the checkpoints' findings
            self._extend(conn, leaves, note)
            self._compare(note)
        self._compare(note)
        self._upper_tiles(conn, note)

    def _extend(self, conn: sqlite3.Connection, leaves: list[bytes], note: Notes) -> None:
        """Push the leaves onto the recomputed tree, comparing each 256-leaf block with its stored hash."""
        frontier, start = self.frontier, self.frontier.size
        stored = dict(
            conn.execute(
                "SELECT idx, hash FROM tree_hashes WHERE level = 1 AND idx >= ? AND idx <= ?",
                (start // 256, (start + len(leaves)) // 256),
            ).fetchall()
        )

        def compare(index: int, block: bytes) -> None:
            if index in stored and stored[index] != block:
                first = index * 256 + 1
                note(
                    "tree_hashes",
                    None,
                    f"tree_hashes: the stored hash of entries {first}..{first + 255} is not theirs (the entries or the hash were altered)",
                )

        i = 0
        while i < len(leaves):
            if frontier.size % 256 == 0 and len(leaves) - i >= 256:
                block = tlog.fold(leaves[i : i + 256])
                compare(frontier.size // 256, block)
                frontier.push(block, 8)
                i += 256
                continue
            frontier.push(leaves[i])
            self.partial.append(leaves[i])
            i += 1
            if frontier.size % 256 == 0:  # a block completed leaf by leaf (it spanned a note's size)
                compare(frontier.size // 256 - 1, tlog.fold(self.partial))
                self.partial = []
        self.checked[1] = frontier.size // 256

    def _compare(self, note: Notes) -> None:
        while self.pending and self.pending[0][1] <= self.frontier.size:
            number, size, root = self.pending.pop(0)
            if size < self.frontier.size or size <= self.matched:
                continue  # another note for a size already verified: the consistency check reports it
            if self.frontier.root() == root:
                self.matched = size
            else:
                note(
                    "checkpoint_tree",
                    self.matched + 1,
                    f"checkpoint {number}: its note's root is not the tree of the log's first {size} entries; "
                    f"the log was altered in entries {self.matched + 1}..{size}",
                )

    def _upper_tiles(self, conn: sqlite3.Connection, note: Notes) -> None:
        """Stored hashes of levels 2 and up against the level below (the checked part only)."""
        level = 2
        while True:
            below = self.checked.get(level - 1, 0)
            have, target = self.checked.get(level, 0), below // 256
            if target <= have:
                return
            rows = conn.execute(
                "SELECT hash FROM tree_hashes WHERE level = ? AND idx >= ? AND idx < ? ORDER BY idx",
                (level - 1, have * 256, target * 256),
            ).fetchall()
            stored = dict(
                conn.execute(
                    "SELECT idx, hash FROM tree_hashes WHERE level = ? AND idx >= ? AND idx < ?",
                    (level, have, target),
                ).fetchall()
            )
            if len(rows) == (target - have) * 256:
                for n in range(have, target):
                    block = tlog.fold([r[0] for r in rows[(n - have) * 256 : (n - have + 1) * 256]])
                    if n in stored and stored[n] != block:
                        note(
                            "tree_hashes", None, f"tree_hashes: the stored hash {level}/{n} is not its tile's"
                        )
            self.checked[level] = target
            level += 1
