"""The append transaction: a group of log rows, and everything that must commit with them, at once.

For each row, in order: its projection change (``topics``) and its chain link; then the rows, the
changed topics, the hourly rollups, the outbox rows and Before-callback attempts (forwarding), the
delivery attempts recorded meanwhile and ``topic_counts``, and one COMMIT. The group costs a fixed
handful of statements whatever its size.

What goes in and what comes out is plain data (:class:`Append`, :class:`Record` in; :class:`Appended`
out), so that the writer can run this where the requests are not (its own process, fed over a pipe).
Nothing the caller passes in is changed: the stored rows are copies.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from topic_audit import clock
from topic_audit.forwarding import outbox
from topic_audit.log import chain, content, database, projection, rollups
from topic_audit.privacy import erasure
from topic_audit.tencent import models
from topic_audit.writer.requests import Append as Append
from topic_audit.writer.requests import Committed as Committed
from topic_audit.writer.requests import Forward as Forward
from topic_audit.writer.requests import OutOfOrder
from topic_audit.writer.requests import Record as Record
from topic_audit.writer.requests import Row as Row


@dataclass(slots=True)
class Appended:
    """What one append transaction committed."""

    committed: list[Committed] = field(default_factory=list)
    """One per :class:`Append`, in order."""
    rows: list[Row] = field(default_factory=list)
    """The stored rows (with id, chain links and the projection's outcome), in order."""
    counts: tuple[int, int] | None = None
    """When the group changed any topic's state: the topics now active and deleted."""
    exhausted: list[list[outbox.Attempt]] = field(default_factory=list)
    """One per :class:`Record`: the attempts that exhausted their schedule."""


_INSERT = (
    f"INSERT INTO audit_log ({', '.join(chain.COLUMNS)}) VALUES ({', '.join(':' + c for c in chain.COLUMNS)})"
)
_COUNT = (
    "UPDATE topic_counts SET topics = topics + CASE state WHEN 'active' THEN ? ELSE ? END "
    "RETURNING state, topics"
)


def commit(
    conn: sqlite3.Connection,
    appends: Sequence[Append],
    records: Sequence[Record] = (),
    store_bodies: str = "all",
    record_key: Ed25519PrivateKey | None = None,
) -> Appended:
    """Append ``appends`` and record ``records`` in one transaction on ``conn`` (autocommit mode).

    Every row commits to its content under a salt of its own (:func:`topic_audit.log.content.seal`). With
    ``store_bodies="topics"``, a row outside the topic family that is not to be forwarded is stored
    without its content, under a ``policy`` erasure record written in the same transaction (signed with
    ``record_key``, the checkpoint signing key)."""
    done = Appended()
    with database.transaction(conn):
        head_id, head_hash = database.head(conn)  # under the write lock: the chain stays contiguous
        group = _Group(conn, head_id + 1, appends, record_key)
        intake = _Intake(conn) if appends and appends[0].intake is not None else None
        for request in appends:
            if intake is not None and (first := intake.copy_of(request, done)) is not None:
                done.committed.append(first)  # a second copy of a message: recorded, not appended
                continue
            entry_id, row = group.add(request)
            row["id"], row["prev_hash"] = entry_id, head_hash
            salt = None if request.intake is None else request.intake.salt
            group.seal(entry_id, row, store_bodies == "all" or _kept(request), salt)
            row["entry_hash"] = head_hash = chain.entry_hash(row)
            done.rows.append(row)
            done.committed.append(Committed(entry_id, row["outcome"], row["duplicate_of"], head_hash))
            if intake is not None:
                intake.applied(request, entry_id)
        group.flush(done.rows)
        if intake is not None:
            intake.flush()
        if records:
            now = clock.now()
            done.exhausted = [outbox.record_in(conn, r.attempts, r.schedule, now) for r in records]
        if group.delta["active"] or group.delta["deleted"]:
            found = dict(conn.execute(_COUNT, (group.delta["active"], group.delta["deleted"])).fetchall())
            done.counts = found["active"], found["deleted"]
    return done


def _kept(request: Append) -> bool:
    """Under ``store_bodies="topics"``: the topic family keeps its content, and so does a callback to be
    forwarded (until its deliveries are done: :meth:`topic_audit.writer.retention.OnTheWriter.sweep`)."""
    forwarded = request.forward is not None and bool(request.forward.destinations)
    return forwarded or request.row.get("callback_command") in models.TOPIC_COMMANDS


class _Group:
    """The rows of one transaction being projected, and what they queue for forwarding."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        first_id: int,
        appends: Sequence[Append],
        record_key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.conn = conn
        self.record_key = record_key
        self.next_id = first_id
        self.store = projection.SqlStore(conn)
        self.store.prefetch(
            [t for a in appends if a.event is not None for t in projection.topic_ids(a.event)]
        )
        self.delta = {"active": 0, "deleted": 0}
        self.queued: dict[float, list[tuple[int, str, str]]] = {}
        self.before: list[outbox.Attempt] = []
        self.salts: list[tuple[int, bytes]] = []
        self.unkept: list[int] = []

    def add(self, request: Append) -> tuple[int, Row]:
        """The next id and the stored row of ``request`` (a copy), projected; its forwarding noted."""
        entry_id, self.next_id = self.next_id, self.next_id + 1
        row = dict(request.row)
        if (forward := request.forward) is not None:
            for destination in forward.destinations:
                self.queued.setdefault(forward.delay, []).append((entry_id, destination, row["received_at"]))
            if forward.before is not None:
                self.before.append(dataclasses.replace(forward.before, audit_id=entry_id))
        if (event := request.event) is not None:
            sha = row["request_body_sha256"]
            effect = projection.project(event, entry_id, row["received_at"], sha, self.store.lookup)
            row["outcome"], row["duplicate_of"] = effect.outcome, effect.duplicate_of
            self.store.write(effect, sha, entry_id)
            delta = self.delta
            for before, after in effect.changes:
                if (was := projection.state(before)) != (now := projection.state(after)):
                    if was is not None:
                        delta[was] -= 1
                    if now is not None:
                        delta[now] += 1
        return entry_id, row

    def seal(self, entry_id: int, row: Row, keep: bool, salt: bytes | None = None) -> None:
        salt = content.seal(row, keep, salt)
        if salt is not None:
            self.salts.append((entry_id, salt))
        else:
            self.unkept.append(entry_id)

    def flush(self, rows: list[Row]) -> None:
        """Write the changed topics, the rows, their rollups and what they queue for forwarding."""
        conn = self.conn
        self.store.flush()
        if rows:
            conn.executemany(_INSERT, rows)
            conn.executemany("INSERT INTO content_keys (entry_id, salt) VALUES (?, ?)", self.salts)
            if self.unkept:
                erasure.record_policy(conn, self.unkept, rows[-1]["received_at"], self.record_key)
            rollups.add(conn, rows)
        for delay, triples in self.queued.items():
            outbox.queue(conn, triples, delay)
        if self.before:
            outbox.append(conn, self.before)


def last_applied(conn: sqlite3.Connection, stream: str) -> int:
    """The sequence of intake ``stream`` applied last (0 for none): an index search."""
    found = conn.execute("SELECT max(seq) FROM cluster_intake WHERE stream = ?", (stream,)).fetchone()
    return int(found[0] or 0)


class _Intake:
    """Cluster mode: the intake messages of one transaction, each applied exactly once and, within its
    stream, in order (the ``cluster_intake`` table, written with the rows)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.last: dict[str, int] = {}
        """The sequence applied last from each stream, looked up once a transaction (an index search)."""
        self.rows: list[tuple[str, int, str, int | None]] = []
        self.entries: dict[str, int] = {}
        """This transaction's messages: the entry each became."""

    def copy_of(self, request: Append, done: Appended) -> Committed | None:
        """What the first copy of ``request``'s message became, when it was applied already (the
        message's sequence is recorded); None for a message to append. :class:`OutOfOrder` for one that
        does not follow the last one applied from its stream."""
        message = request.intake
        if message is not None and message.stream not in self.last:
            self.last[message.stream] = last_applied(self.conn, message.stream)
        last = 0 if message is None else self.last[message.stream]
        if message is not None and time.monotonic() > message.valid_until:
            raise OutOfOrder(
                f"intake message {message.stream} {message.seq}: the writer lease is not confirmed"
            )
        if message is None or message.after != last or message.seq <= last:
            got = (
                "no intake message"
                if message is None
                else f"{message.stream} {message.seq} after {message.after}"
            )
            raise OutOfOrder(f"intake message {got}; the last applied from it is {last}")
        self.last[message.stream] = message.seq
        first = self.entries.get(message.msg_id)
        if first is None:
            found = self.conn.execute(
                "SELECT entry_id FROM cluster_intake WHERE msg_id = ? AND entry_id IS NOT NULL",
                (message.msg_id,),
            ).fetchone()
            first = None if found is None else found[0]
        if first is None:
            return None
        self.rows.append((message.stream, message.seq, message.msg_id, None))
        for row in done.rows:
            if row["id"] == first:
                return Committed(first, row["outcome"], row["duplicate_of"], row["entry_hash"])
        outcome, duplicate_of, entry_hash = self.conn.execute(
            "SELECT outcome, duplicate_of, entry_hash FROM audit_log WHERE id = ?", (first,)
        ).fetchone()
        return Committed(first, outcome, duplicate_of, entry_hash)

    def applied(self, request: Append, entry_id: int) -> None:
        message = request.intake
        assert message is not None
        self.entries[message.msg_id] = entry_id
        self.rows.append((message.stream, message.seq, message.msg_id, entry_id))

    def flush(self) -> None:
        self.conn.executemany(
            "INSERT INTO cluster_intake (stream, seq, msg_id, entry_id) VALUES (?, ?, ?, ?)", self.rows
        )


def append_batch(
    conn: sqlite3.Connection,
    items: Sequence[
        tuple[Row, models.TopicEvent | None] | tuple[Row, models.TopicEvent | None, Forward | None]
    ],
    deliveries: Sequence[tuple[Sequence[outbox.Attempt], tuple[int, ...]]] = (),
) -> Appended:
    """:func:`commit` for (row, event[, forwarding]) tuples and (attempts, schedule) pairs (the log
    generator and the benchmarks call it without a writer)."""
    appends = [Append(item[0], item[1], item[2] if len(item) > 2 else None) for item in items]
    return commit(conn, appends, [Record(attempts, schedule) for attempts, schedule in deliveries])
