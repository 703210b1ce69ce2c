"""Forwarding's storage: the ``outbox`` (what each destination still has to get) and the ``deliveries``
log (every attempt, append-only and hash-chained like ``audit_log``).

A delivery's canonical form is the JSON object of every column of ``deliveries`` except ``entry_hash``,
keys sorted, no whitespace, non-ASCII kept as UTF-8, SQL NULL as ``null``; ``entry_hash`` is its SHA-256
(hex) and ``prev_hash`` the previous delivery's (64 zeros for the first). The chain is its own, beside the
log's; signed checkpoints cover its head too.

Outbox rows are queued in the transaction that appends their log row (so nothing acknowledged is ever
without its pending deliveries); attempts are recorded, and the outbox row moved on, in one transaction.
The outbox is current state, derived from the log and ``deliveries`` (:func:`rebuild`).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import msgspec

from topic_audit import clock
from topic_audit.log import chain, database
from topic_audit.tencent import checks

COLUMNS: Final = (
    "id",
    "audit_id",
    "destination",
    "kind",
    "attempt",
    "started_at",
    "status_code",
    "error",
    "detail",
    "response_body",
    "elapsed_ms",
    "replay",
    "prev_hash",
    "entry_hash",
)
SORTED: Final = tuple(sorted(c for c in COLUMNS if c != "entry_hash"))
RESPONSE_LIMIT: Final = 2048
"""Characters of a destination's answer kept in ``deliveries.response_body``."""
ERRORS: Final = ("http_error", "timeout", "connection_error")

NOT_FORWARDED: Final = checks.NOT_FORWARDED
"""The rejections never forwarded: the outbox's filter of the forwardable entries (:data:`FORWARDABLE`)."""

_Canonical = msgspec.defstruct("_Canonical", [(name, object) for name in SORTED])
_encoder = msgspec.json.Encoder()
_INSERT = f"INSERT INTO deliveries ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def is_before(command: str | None) -> bool:
    """A Before-callback: the app may veto it, so it is forwarded before Tencent is answered."""
    return command is not None and ".CallbackBefore" in command


def canonical(values: Sequence[object]) -> bytes:
    """The canonical form of a delivery given as its values in :data:`SORTED` order."""
    return _encoder.encode(_Canonical(*values))


def delivery_hash(row: dict[str, Any]) -> str:
    return hashlib.sha256(canonical([row[c] for c in SORTED])).hexdigest()


@dataclass(slots=True)
class Attempt:
    """One delivery attempt, as recorded in ``deliveries``."""

    audit_id: int
    destination: str
    kind: str
    attempt: int
    started_at: str
    elapsed_ms: float
    status_code: int | None = None
    error: str | None = None
    detail: str | None = None
    response_body: str | None = None
    replay: int = 0
    round_queued_at: str | None = None
    """``outbox.queued_at`` of the round this attempt belongs to: a replay queued meanwhile starts a new
    round, which the attempt's outcome must not overwrite (not stored in ``deliveries``)."""

    @property
    def delivered(self) -> bool:
        return self.error is None

    def row(self) -> dict[str, Any]:
        return {
            "audit_id": self.audit_id,
            "destination": self.destination,
            "kind": self.kind,
            "attempt": self.attempt,
            "started_at": self.started_at,
            "status_code": self.status_code,
            "error": self.error,
            "detail": self.detail,
            "response_body": self.response_body,
            "elapsed_ms": round(self.elapsed_ms, 3),
            "replay": self.replay,
        }


@dataclass(frozen=True, slots=True)
class Forward:
    """What forwarding records with a log row, in its transaction: the destinations to queue in the
    outbox (due ``delay`` seconds after receipt), and a Before-callback's attempt (recorded with the
    row's id as its ``audit_id``)."""

    destinations: tuple[str, ...] = ()
    delay: float = 0.0
    before: Attempt | None = None


def append(conn: sqlite3.Connection, attempts: Iterable[Attempt]) -> int:
    """Append ``attempts`` to ``deliveries``, chained, inside the caller's transaction; the new head id."""
    head = conn.execute("SELECT id, entry_hash FROM deliveries ORDER BY id DESC LIMIT 1").fetchone()
    head_id, head_hash = head if head is not None else (0, chain.GENESIS)
    rows = []
    for attempt in attempts:
        row = attempt.row()
        head_id += 1
        row["id"], row["prev_hash"] = head_id, head_hash
        row["entry_hash"] = head_hash = delivery_hash(row)
        rows.append(tuple(row[c] for c in COLUMNS))
    conn.executemany(_INSERT, rows)
    return head_id


def later(received_at: str, seconds: float) -> str:
    """``received_at`` (ISO-8601 UTC, ms) plus ``seconds``, in the same form (so strings sort as times)."""
    moment = clock.parse(received_at)
    return clock.of(moment + timedelta(seconds=seconds))


def queue(
    conn: sqlite3.Connection, items: Iterable[tuple[int, str, str]], first_delay: float, replay: int = 0
) -> int:
    """Queue (audit_id, destination, at) triples inside the caller's transaction, each due
    ``first_delay`` s after its ``at``. An existing row starts a new round (a replay) instead.
    Returns how many were queued."""
    rows = [
        (audit_id, destination, later(at, first_delay), replay, at, at) for audit_id, destination, at in items
    ]
    conn.executemany(
        "INSERT INTO outbox (audit_id, destination, state, attempts, step, next_attempt_at, replay, queued_at, "
        "updated_at) VALUES (?, ?, 'pending', 0, 0, ?, ?, ?, ?) ON CONFLICT (audit_id, destination) DO UPDATE "
        "SET state = 'pending', step = 0, next_attempt_at = excluded.next_attempt_at, replay = excluded.replay, "
        "queued_at = excluded.queued_at, updated_at = excluded.updated_at",
        rows,
    )
    return len(rows)


@dataclass(frozen=True, slots=True)
class Due:
    """A pending delivery that is due, with what its attempt sends."""

    audit_id: int
    destination: str
    attempts: int
    replay: int
    query_string: str
    body: bytes
    request_headers: str
    queued_at: str


def due(
    conn: sqlite3.Connection, destination: str, now: str, limit: int, skip: Iterable[int] = ()
) -> list[Due]:
    """The pending deliveries to ``destination`` due at ``now``, oldest first, at most ``limit``, but
    those of the entries in ``skip`` (attempts under way)."""
    found = conn.execute(
        "SELECT o.audit_id, o.destination, o.attempts, o.replay, a.query_string, CAST(a.request_body AS BLOB), "
        "a.request_headers, o.queued_at FROM outbox o JOIN audit_log a ON a.id = o.audit_id "
        "WHERE o.state = 'pending' AND o.destination = ? AND o.next_attempt_at <= ? "
        "AND o.audit_id NOT IN (SELECT value FROM json_each(?)) ORDER BY o.next_attempt_at LIMIT ?",
        (destination, now, json.dumps(list(skip)), limit),
    ).fetchall()
    return [Due(r[0], r[1], r[2], r[3], r[4], r[5] or b"", r[6], r[7]) for r in found]


def next_due(conn: sqlite3.Connection, destination: str) -> str | None:
    """When the earliest pending delivery to ``destination`` falls due (ISO), None when none is pending
    (one step down the outbox index, whatever the backlog)."""
    row = conn.execute(
        "SELECT next_attempt_at FROM outbox WHERE state = 'pending' AND destination = ? "
        "ORDER BY next_attempt_at LIMIT 1",
        (destination,),
    ).fetchone()
    return row[0] if row else None


def backlog(conn: sqlite3.Connection) -> dict[str, tuple[int, str]]:
    """Per destination: pending deliveries and when the oldest of them was queued."""
    return {
        r[0]: (r[1], r[2])
        for r in conn.execute(
            "SELECT destination, count(*), min(queued_at) FROM outbox WHERE state = 'pending' GROUP BY destination"
        )
    }


def record(
    conn: sqlite3.Connection, attempts: Sequence[Attempt], schedule: Sequence[int], now: str
) -> list[Attempt]:
    """:func:`record_in` in a transaction of its own (``conn`` in autocommit mode)."""
    with database.transaction(conn):
        return record_in(conn, attempts, schedule, now)


def record_in(
    conn: sqlite3.Connection, attempts: Sequence[Attempt], schedule: Sequence[int], now: str
) -> list[Attempt]:
    """Append the attempts to ``deliveries`` and move their outbox rows on, inside the caller's
    transaction (the writer's group commit). Returns the attempts that exhausted the schedule."""
    append(conn, attempts)
    # Each update applies only to the round the attempt belongs to: a replay queued while it was under
    # way stays pending.
    same_round = "audit_id = ? AND destination = ? AND (? IS NULL OR queued_at = ?)"
    conn.executemany(
        "UPDATE outbox SET state = 'delivered', attempts = ?, next_attempt_at = NULL, last_error = NULL, "
        f"updated_at = ? WHERE {same_round}",
        [(a.attempt, now, *_round(a)) for a in attempts if a.delivered],
    )
    exhausted: list[Attempt] = []
    for attempt in attempts:
        if attempt.delivered:
            continue
        found = conn.execute(f"SELECT step FROM outbox WHERE {same_round}", _round(attempt)).fetchone()
        if found is None:  # replayed meanwhile
            continue
        step = found[0] + 1
        error = f"{attempt.error}: {attempt.detail}" if attempt.detail else attempt.error
        if step < len(schedule):
            conn.execute(
                "UPDATE outbox SET attempts = ?, step = ?, next_attempt_at = ?, last_error = ?, updated_at = ? "
                f"WHERE {same_round}",
                (attempt.attempt, step, later(now, schedule[step]), error, now, *_round(attempt)),
            )
        else:
            exhausted.append(attempt)
            conn.execute(
                "UPDATE outbox SET state = 'failed', attempts = ?, step = ?, next_attempt_at = NULL, "
                f"last_error = ?, updated_at = ? WHERE {same_round}",
                (attempt.attempt, step, error, now, *_round(attempt)),
            )
    return exhausted


def _round(attempt: Attempt) -> tuple[int, str, str | None, str | None]:
    return attempt.audit_id, attempt.destination, attempt.round_queued_at, attempt.round_queued_at


FORWARDABLE = (
    "SELECT id, received_at FROM audit_log WHERE method = 'POST' AND "
    f"coalesce(reason, '') NOT IN ({', '.join(repr(r) for r in sorted(NOT_FORWARDED))}) "
    "AND outcome != 'error' AND coalesce(callback_command, '') NOT LIKE '%.CallbackBefore%'"
)
"""The log entries whose after-deliveries the outbox holds (Before-callbacks are never retried)."""
_NOT_ERASED = "id NOT IN (SELECT entry_id FROM erased_entries)"
"""Not erased: nothing of an erased entry is left to send."""


def replay(
    conn: sqlite3.Connection,
    destinations: Sequence[str],
    now: str,
    *,
    failed_only: bool = False,
    ids: tuple[int, int] | None = None,
) -> int:
    """Queue deliveries again (``replay`` = 1), in one transaction: the failed ones, or every forwardable
    entry with ``ids[0] <= id <= ids[1]``, to each of ``destinations``. Returns how many were queued."""
    with database.transaction(conn):
        pairs: list[tuple[int, str, str]] = []
        for destination in destinations:
            if failed_only:
                # an erased entry's delivery ended as 'erased': there is nothing left to send
                where = "state = 'failed' AND coalesce(last_error, '') != 'erased' AND destination = ?"
                params: list[object] = [destination]
                if ids is not None:
                    where += " AND audit_id BETWEEN ? AND ?"
                    params += list(ids)
                found = conn.execute(f"SELECT audit_id FROM outbox WHERE {where}", params)
            else:
                assert ids is not None
                found = conn.execute(
                    f"{FORWARDABLE} AND id BETWEEN ? AND ? AND NOT EXISTS (SELECT 1 FROM outbox o WHERE "
                    "o.audit_id = audit_log.id AND o.destination = ? AND o.state = 'pending') "
                    f"AND {_NOT_ERASED}",
                    (*ids, destination),
                )
            pairs += [(row[0], destination, now) for row in found]
        queue(conn, pairs, 0, replay=1)
    return len(pairs)


def rebuild(conn: sqlite3.Connection, destinations: Sequence[str], schedule: Sequence[int], now: str) -> int:
    """Set ``outbox`` to what the log and ``deliveries`` say, in one transaction: for every forwardable
    entry and each of ``destinations`` (and every destination its deliveries name), ``delivered`` when
    an attempt succeeded, ``failed`` when the attempts reached the schedule's length, else ``pending``
    and due now. Replay rounds are not told apart (``step`` counts every attempt). Returns the rows."""
    with database.transaction(conn):
        conn.execute("DELETE FROM outbox")
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (destination TEXT PRIMARY KEY)")
        conn.execute("DELETE FROM temp.wanted")
        conn.executemany("INSERT OR IGNORE INTO temp.wanted VALUES (?)", [(d,) for d in destinations])
        conn.execute(
            f"""
            INSERT INTO outbox (audit_id, destination, state, attempts, step, next_attempt_at, last_error,
                                replay, queued_at, updated_at)
            WITH pairs AS (
                SELECT e.id AS audit_id, w.destination, e.received_at FROM ({FORWARDABLE}) e, temp.wanted w
                UNION
                SELECT d.audit_id, d.destination, e.received_at FROM deliveries d
                JOIN ({FORWARDABLE}) e ON e.id = d.audit_id WHERE d.kind = 'after'
            ),
            tried AS (
                SELECT audit_id, destination, max(attempt) AS attempts, max(error IS NULL) AS delivered,
                       max(id) AS last FROM deliveries WHERE kind = 'after' GROUP BY audit_id, destination
            )
            SELECT p.audit_id, p.destination,
                   CASE WHEN t.delivered THEN 'delivered' WHEN coalesce(t.attempts, 0) >= :steps THEN 'failed'
                        ELSE 'pending' END,
                   coalesce(t.attempts, 0), coalesce(t.attempts, 0),
                   CASE WHEN t.delivered OR coalesce(t.attempts, 0) >= :steps THEN NULL ELSE :now END,
                   CASE WHEN t.delivered THEN NULL
                        ELSE (SELECT d.error || coalesce(': ' || d.detail, '') FROM deliveries d WHERE d.id = t.last) END,
                   coalesce((SELECT d.replay FROM deliveries d WHERE d.id = t.last), 0),
                   p.received_at, :now
            FROM pairs p LEFT JOIN tried t ON t.audit_id = p.audit_id AND t.destination = p.destination
            """,
            {"steps": len(schedule), "now": now},
        )
        count = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    return count
