"""What every check reports (:class:`Finding`), what it reads (:class:`Snapshot`) and what it is
(:class:`Check`), apart from the checks themselves so that each imports only this."""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    """``ids``, ``body``, ``chain``, ``hash``, ``content``, ``erasure_*`` (among them
    ``erasure_signature``: a record not signed by the log's key), ``log_facts`` (a boundary changed
    since a checkpoint signed it), ``delivery_*``, ``checkpoint_*`` (among them the tree's
    ``checkpoint_note``, ``checkpoint_tree`` and ``checkpoint_consistency``), ``tree_hashes`` (and, from
    ``verify`` alone, ``projection`` and ``replay``)."""
    entry_id: int | None
    """The first audit_log entry that may be bad, or None where the finding is not about one entry (a
    delivery names its id in the message)."""
    message: str
    topic_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Notes:
    """The first finding of each kind, as a pass over the log meets them; :meth:`findings` in log order."""

    def __init__(self) -> None:
        self._found: dict[str, Finding] = {}

    def __call__(self, check: str, entry_id: int | None, message: str) -> None:
        self._found.setdefault(check, Finding(check, entry_id, message))

    def __contains__(self, check: str) -> bool:
        return check in self._found

    def findings(self) -> list[Finding]:
        return sorted(self._found.values(), key=lambda f: f.entry_id or 0)


@dataclass
class Snapshot:
    """One consistent look at a log: ``conn`` inside one read transaction, and the checkpoint file's
    lines as read just before it began (so every entry a line signs is in the snapshot)."""

    conn: sqlite3.Connection
    file: Path
    lines: list[dict[str, Any]]
    file_error: str | None = None
    """Why the checkpoint file could not be read (then ``lines`` is empty)."""
    _last: dict[str, int] = field(default_factory=dict)

    def has(self, table: str) -> bool:
        return bool(self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone())

    def last_id(self, table: str) -> int:
        """The highest id in ``table`` (0 when empty or absent), read once per snapshot."""
        if table not in self._last:
            self._last[table] = (
                int(self.conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0])
                if self.has(table)
                else 0
            )
        return self._last[table]


class Check(Protocol):
    """One kind of integrity check, resumable: each call goes on from where the last one stopped."""

    def advance(self, snapshot: Snapshot) -> list[Finding]:
        """Check what was added since the last call (everything, on the first), and that what was
        checked before is still there, unchanged, as far as what was remembered of it tells."""
        ...

    def sweep(self, snapshot: Snapshot, budget: int) -> list[Finding]:
        """Check again up to ``budget`` of the items checked by earlier calls, going on where the last
        sweep stopped and starting over at the end."""
        ...


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
