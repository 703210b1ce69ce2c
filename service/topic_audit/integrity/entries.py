"""The hash chain over ``audit_log``: ids, body hashes, links and entry hashes, over any range of ids,
and :class:`Entries`, the check that goes on from the last verified entry and sweeps the older ones."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from typing import Protocol

from topic_audit.integrity.findings import Finding, Notes, Snapshot
from topic_audit.log import chain, content

Progress = Callable[[int], None]
ChainResult = tuple[list[Finding], int, str]
Start = tuple[int, str, str | None]
"""Where a pass over the chain starts: the id it expects next, the hash the next entry must link to,
and the hash before that one (None: unknown), with which an inserted entry is told from an altered one."""
FRESH: Start = (1, chain.GENESIS, None)

# Every hashed column in canonical order, then the body's bytes (TEXT is stored as UTF-8: the CAST gives
# exactly the bytes received) and the stored hash. Python encodes the canonical form with the same
# encoder the writer used, so whatever a row holds (a BLOB or a float where none belongs), it is hashed
# by the definition itself.
_COLUMNS = f"{', '.join('a.' + c for c in chain.SORTED)}, CAST(a.request_body AS BLOB), a.entry_hash"
_READ = f"SELECT {_COLUMNS}, 0, NULL FROM audit_log a WHERE a.id > ? AND a.id <= ? ORDER BY a.id"
_READ_ERASABLE = (
    f"SELECT {_COLUMNS}, e.entry_id IS NOT NULL, k.salt FROM audit_log a "
    "LEFT JOIN erased_entries e ON e.entry_id = a.id LEFT JOIN content_keys k ON k.entry_id = a.id "
    "WHERE a.id > ? AND a.id <= ? ORDER BY a.id"
)
"""With keyed commitments (m014): whether each entry is erased, and its salt."""
_ID, _PREV, _BODY_SHA, _COMMITMENT = (
    chain.SORTED.index(c) for c in ("id", "prev_hash", "request_body_sha256", "content_commitment")
)
_CONTENT = tuple((name, chain.SORTED.index(name)) for name in content.CONTENT if name != "request_body")
ALL = (-(2**63), 2**63 - 1)
PROGRESS_EVERY = 10_000


def verify_chain(
    conn: sqlite3.Connection,
    progress: Progress | None = None,
    ids: tuple[int, int] = ALL,
    start: Start | None = None,
) -> ChainResult:
    """Recompute the chain over the entries with ``ids[0] < id <= ids[1]`` (all by default).

    Returns the findings (the first of each kind), the row count and the last entry's hash. Without
    ``start``, a range starts from the two entries before it, exactly as a pass over the whole log would
    reach it, so ranges checked apart report what one pass would.
    """
    note = Notes()
    sha256, canonical = hashlib.sha256, chain.canonical_values
    width = len(chain.SORTED)
    expected_id, prev_hash, before_prev = start or _start(conn, ids[0])
    count = 0
    erasable = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'erased_entries'").fetchone()
    keyed_from = commitments_from(conn)
    # Row by row, not fetchmany: a batch of 10,000 wide rows costs more than the rows themselves.
    for count, row in enumerate(conn.execute(_READ_ERASABLE if erasable else _READ, ids), 1):
        entry_id, row_prev, body, row_hash = row[_ID], row[_PREV], row[width], row[width + 1]
        erased, salt, committed = row[width + 2], row[width + 3], row[_COMMITMENT] is not None
        unkeyed = not committed and entry_id >= keyed_from
        if unkeyed:
            note(
                "content",
                entry_id,
                f"entry {entry_id} has no content commitment; every entry from {keyed_from} must have one",
            )
        if entry_id != expected_id:
            note(
                "ids",
                expected_id,
                f"expected id {expected_id}, found {entry_id}: entries missing or inserted",
            )
        if erased:
            _check_erased(note, entry_id, row, body, salt)
        else:
            if sha256(body or b"").hexdigest() != row[_BODY_SHA]:
                note("body", entry_id, "request_body does not match request_body_sha256")
            if committed:
                _check_commitment(note, entry_id, row, body, salt)
        if row_prev != prev_hash:
            if row_prev == before_prev:  # links past the previous entry: that one was inserted
                note(
                    "chain",
                    entry_id - 1,
                    f"entry {entry_id - 1} was inserted: entry {entry_id} links past it",
                )
            else:
                note("chain", entry_id, "prev_hash is not the previous entry's entry_hash")
        # An erased entry from before keyed commitments (ids below ``log_facts.commitments_from``) hashed
        # its content: its evidence is checked against the erasure record that committed to it instead
        # (integrity.erasures). Any later entry is hashed over its evidence and commitment, erased or not.
        if (committed or not erased or unkeyed) and sha256(canonical(row[:width])).hexdigest() != row_hash:
            note("hash", entry_id, "entry_hash does not match the entry's canonical form")
        before_prev, prev_hash, expected_id = prev_hash, row_hash, entry_id + 1
        if progress is not None and not count % PROGRESS_EVERY:
            progress(PROGRESS_EVERY)
    if progress is not None:
        progress(count % PROGRESS_EVERY)
    return note.findings(), count, prev_hash


def commitments_from(conn: sqlite3.Connection) -> int:
    """``log_facts.commitments_from``: the first entry that must carry a keyed content commitment (no
    bound before ``m017``)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'log_facts'").fetchone() is None:
        return ALL[1] + 1
    row = conn.execute("SELECT value FROM log_facts WHERE name = 'commitments_from'").fetchone()
    return 1 if row is None else int(row[0])  # the fact removed: every entry must have one


def _content(row: tuple[object, ...], body: object) -> dict[str, object]:
    values = {name: row[index] for name, index in _CONTENT}
    values["request_body"] = body
    return values


def _check_erased(note: Notes, entry_id: int, row: tuple[object, ...], body: object, salt: object) -> None:
    if not content.is_erased(_content(row, body)):
        note("erasure", entry_id, "an erased entry still holds content")
    elif salt is not None:
        note("erasure", entry_id, "an erased entry still has the salt of its commitment")


def _check_commitment(
    note: Notes, entry_id: int, row: tuple[object, ...], body: object, salt: object
) -> None:
    if not isinstance(salt, bytes):
        note("content", entry_id, "content removed without a recorded erasure (its salt is gone)")
    elif content.commitment(salt, _content(row, body)) != row[_COMMITMENT]:
        note("content", entry_id, "content does not match its commitment")


def _start(conn: sqlite3.Connection, after: int) -> Start:
    before = conn.execute(
        "SELECT id, entry_hash FROM audit_log WHERE id <= ? ORDER BY id DESC LIMIT 2", (after,)
    ).fetchall()
    if not before:
        return FRESH
    return before[0][0] + 1, before[0][1], before[1][1] if len(before) > 1 else chain.GENESIS


def _lowest(conn: sqlite3.Connection) -> int:
    """Where a pass from the start begins: ids below 1 are read too (an entry moved there is a finding,
    not a row skipped)."""
    return int(min(conn.execute("SELECT coalesce(min(id), 1) - 1 FROM audit_log").fetchone()[0], 0))


class ChainRunner(Protocol):
    """How :class:`Entries` recomputes a range: :func:`verify_chain` here, or ``verify``'s process pool."""

    def __call__(self, conn: sqlite3.Connection, ids: tuple[int, int], start: Start) -> ChainResult: ...


def _in_this_process(conn: sqlite3.Connection, ids: tuple[int, int], start: Start) -> ChainResult:
    return verify_chain(conn, ids=ids, start=start)


class Entries:
    """The chain, resumed from the last verified entry (its id and hash remembered: a log rewritten or
    cut short behind it is found at once), and a rolling sweep over what earlier rounds verified."""

    def __init__(self, run: ChainRunner = _in_this_process) -> None:
        self.run = run
        self.verified: tuple[int, str] = (0, chain.GENESIS)
        """The last entry verified (id, entry_hash)."""
        self.start: Start = FRESH
        self.appended = 0
        """Entries checked by the last :meth:`advance`."""
        self.cursor = 0
        """Where the sweep goes on (entries after this id)."""
        self.swept = (0, 0)

    def advance(self, snapshot: Snapshot) -> list[Finding]:
        conn, (last_id, last_hash) = snapshot.conn, self.verified
        head, self.appended = snapshot.last_id("audit_log"), 0
        if head < last_id:
            message = f"the log has {head} entries; {last_id} were verified: entries removed"
            return [Finding("ids", head + 1, message)]
        found: list[Finding] = []
        if last_id:
            stored = conn.execute("SELECT entry_hash FROM audit_log WHERE id = ?", (last_id,)).fetchone()
            if stored is None or stored[0] != last_hash:
                message = f"entry {last_id} is no longer the one verified: the log was rewritten"
                found.append(Finding("chain", last_id, message))
        low = last_id or _lowest(conn)
        if head > last_id:
            chained, self.appended, head_hash = self.run(conn, (low, head), self.start)
            found += chained
            self.verified, self.start = (head, head_hash), _start(conn, head)
        return sorted(found, key=lambda f: f.entry_id or 0)

    def sweep(self, snapshot: Snapshot, budget: int) -> list[Finding]:
        limit = min(self.verified[0], snapshot.last_id("audit_log"))
        if not limit:
            self.swept = (0, 0)
            return []
        start = self.cursor if self.cursor < limit else 0
        end = min(start + budget, limit)
        ids, begin = ((_lowest(snapshot.conn), end), FRESH) if start == 0 else ((start, end), None)
        found, _, _ = verify_chain(snapshot.conn, ids=ids, start=begin)
        self.cursor, self.swept = (end if end < limit else 0), (start, end)
        return found
