"""The ``topics`` projection: what a topic event does to the current state, as a pure function.

:func:`project` decides, from the state before the event, whether it is new (``accepted``) or a
redelivery (``duplicate``, with the entry it repeats) and which rows it changes. The writer calls it
inside the transaction that appends the log row; :func:`replay` runs the log through the same function
(for ``verify`` and ``rebuild-projection``), so the projection is always a replay of the log.

Redelivery rules (Tencent retries after-events on timeout, with the same body):
- create: the topic was already created by an earlier entry;
- info changed: the body is identical to the one that last changed the topic;
- destroyed: every topic in the list is already deleted.
Events for topics never seen (created before the service existed) are applied as far as they go.
"""

from __future__ import annotations

import contextlib
import gc
import operator
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import msgspec

from topic_audit.log import content
from topic_audit.tencent import models

COLUMNS: Final = (
    "topic_id",
    "group_id",
    "name",
    "type",
    "owner_account",
    "operator_account",
    "custom_data",
    "introduction",
    "notification",
    "face_url",
    "created_at",
    "created_entry_id",
    "updated_at",
    "updated_entry_id",
    "deleted_at",
    "deleted_entry_id",
)

Topic = dict[str, Any]
# topic_id -> (current row or None, request_body_sha256 of the entry at its updated_entry_id)
Lookup = Callable[[str], tuple[Topic | None, str | None]]


@dataclass(slots=True)
class Effect:
    outcome: str
    duplicate_of: int | None = None
    changes: list[tuple[Topic | None, Topic]] = field(default_factory=list)
    """(row before, row after) for every topic the event changes."""


def state(row: Topic | None) -> str | None:
    """``active``, ``deleted``, or None for a topic not in the projection."""
    if row is None:
        return None
    return "deleted" if row["deleted_entry_id"] is not None else "active"


def _blank(topic_id: str, group_id: str) -> Topic:
    row: Topic = dict.fromkeys(COLUMNS)
    row["topic_id"] = topic_id
    row["group_id"] = group_id
    return row


def _merge_custom(current: str | None, items: list[models.UserDefinedData] | None) -> str | None:
    new = models.custom_data(items)
    if new is None:
        return current
    merged = {**msgspec.json.decode(current), **new} if current else new
    return msgspec.json.encode(merged).decode()


def project(event: models.TopicEvent, entry_id: int, at: str, body_sha256: str, lookup: Lookup) -> Effect:
    """What ``event`` (entry ``entry_id``, received ``at``) does to the projection."""
    if isinstance(event, models.AfterCreateTopic):
        return _create(event, entry_id, at, lookup)
    if isinstance(event, models.AfterTopicInfoChanged):
        return _change(event, entry_id, at, body_sha256, lookup)
    if isinstance(event, models.AfterTopicDestroyed):
        return _destroy(event, entry_id, at, lookup)
    raise TypeError(f"{type(event).__name__} is not projected")


def _create(event: models.AfterCreateTopic, entry_id: int, at: str, lookup: Lookup) -> Effect:
    before, _ = lookup(event.TopicId)
    if before is not None and before["created_entry_id"] is not None:
        return Effect("duplicate", before["created_entry_id"])
    if before is None:  # the usual case, spelled out: the same row as the general path below
        row = {
            "topic_id": event.TopicId,
            "group_id": event.GroupId,
            "name": event.Name,
            "type": event.Type,
            "owner_account": event.Owner_Account,
            "operator_account": event.Operator_Account,
            "custom_data": _merge_custom(None, event.UserDefinedDataList),
            "introduction": event.Introduction,
            "notification": event.Notification,
            "face_url": event.FaceUrl,
            "created_at": at,
            "created_entry_id": entry_id,
            "updated_at": at,
            "updated_entry_id": entry_id,
            "deleted_at": None,
            "deleted_entry_id": None,
        }
        return Effect("accepted", changes=[(None, row)])
    after = dict(before)
    # An earlier info-change or destroy (delivered out of order) is newer than the create: keep it.
    given = {
        "name": event.Name,
        "type": event.Type,
        "owner_account": event.Owner_Account,
        "operator_account": event.Operator_Account,
        "introduction": event.Introduction,
        "notification": event.Notification,
        "face_url": event.FaceUrl,
    }
    for column, value in given.items():
        if after[column] is None:
            after[column] = value
    if after["custom_data"] is None:
        after["custom_data"] = _merge_custom(None, event.UserDefinedDataList)
    after["created_at"], after["created_entry_id"] = at, entry_id
    if after["updated_entry_id"] is None:
        after["updated_at"], after["updated_entry_id"] = at, entry_id
    return Effect("accepted", changes=[(before, after)])


def _change(
    event: models.AfterTopicInfoChanged, entry_id: int, at: str, body_sha256: str, lookup: Lookup
) -> Effect:
    assert event.TopicId is not None  # the checks do not send a change without TopicId here
    before, last_sha = lookup(event.TopicId)
    if before is not None and last_sha == body_sha256:
        return Effect("duplicate", before["updated_entry_id"])
    after = dict(before) if before is not None else _blank(event.TopicId, event.GroupId)
    changed = {
        "name": event.Name,
        "introduction": event.Introduction,
        "notification": event.Notification,
        "face_url": event.FaceUrl,
        "operator_account": event.Operator_Account,
    }
    for column, value in changed.items():
        if value is not None:
            after[column] = value
    if after["type"] is None:
        after["type"] = event.Type
    after["custom_data"] = _merge_custom(after["custom_data"], event.UserDefinedDataList)
    after["updated_at"], after["updated_entry_id"] = at, entry_id
    return Effect("accepted", changes=[(before, after)])


def _destroy(event: models.AfterTopicDestroyed, entry_id: int, at: str, lookup: Lookup) -> Effect:
    changes: list[tuple[Topic | None, Topic]] = []
    first_deleted_by: int | None = None
    for topic_id in dict.fromkeys(event.TopicIdList):  # a repeated id is one topic
        before, _ = lookup(topic_id)
        if before is not None and before["deleted_entry_id"] is not None:
            first_deleted_by = first_deleted_by or before["deleted_entry_id"]
            continue
        after = dict(before) if before is not None else _blank(topic_id, event.GroupId)
        if after["type"] is None:
            after["type"] = event.Type
        after["deleted_at"], after["deleted_entry_id"] = at, entry_id
        changes.append((before, after))
    if not changes:
        return Effect("duplicate", first_deleted_by)
    return Effect("accepted", changes=changes)


row_values = operator.itemgetter(*COLUMNS)
"""A topic as a tuple in table order."""

# A true upsert (not INSERT OR REPLACE): the row keeps its rowid, which is its key in ``topics_fts``
# (filled behind the writer by topic_audit.log.search, which removes a topic's old texts by that rowid).
UPSERT: Final = (
    f"INSERT INTO topics ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
    f"ON CONFLICT (topic_id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in COLUMNS[1:])}"
)


def topic_ids(event: models.TopicEvent) -> list[str]:
    """The topics ``event`` may change (what :func:`project` will look up)."""
    if isinstance(event, models.AfterTopicDestroyed):
        return list(event.TopicIdList)
    topic_id = getattr(event, "TopicId", None)
    return [topic_id] if topic_id is not None else []


class MemoryStore:
    """The projection held in memory: the whole of it, or a partition, while the log is replayed."""

    def __init__(self) -> None:
        self.rows: dict[str, Topic] = {}
        self.last_sha: dict[str, str | None] = {}

    def lookup(self, topic_id: str) -> tuple[Topic | None, str | None]:
        return self.rows.get(topic_id), self.last_sha.get(topic_id)

    def write(self, effect: Effect, body_sha256: str, entry_id: int) -> None:
        for _, after in effect.changes:
            self.rows[after["topic_id"]] = after
            if after["updated_entry_id"] == entry_id:
                self.last_sha[after["topic_id"]] = body_sha256

    def counts(self) -> dict[str, int]:
        """Topics per state, as ``topic_counts`` holds them."""
        found = {"active": 0, "deleted": 0}
        for row in self.rows.values():
            found[state(row) or "active"] += 1
        return found


class SqlStore(MemoryStore):
    """The projection as a table, for one transaction that the caller holds on ``conn``.

    The topics a group of events touches are read in one query (:meth:`prefetch`), changed in memory,
    and written back once each (:meth:`flush`): a topic created and renamed in the same group costs one
    upsert, and the group makes a handful of calls into SQLite rather than several per row.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        super().__init__()
        self.conn = conn
        self._changed: dict[str, Topic] = {}
        self._select = (
            "SELECT t.*, a.request_body_sha256 FROM topics t "
            "LEFT JOIN audit_log a ON a.id = t.updated_entry_id WHERE t.topic_id IN "
        )

    def prefetch(self, ids: list[str]) -> None:
        """Read the stored rows of ``ids`` (those not read yet) in as few queries as possible."""
        wanted = [i for i in dict.fromkeys(ids) if i not in self.last_sha]
        width = len(COLUMNS)
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            for found in self.conn.execute(self._select + f"({', '.join('?' * len(chunk))})", chunk):
                self.rows[found[0]] = dict(zip(COLUMNS, found[:width], strict=True))
                self.last_sha[found[0]] = found[width]
            for topic_id in chunk:
                self.last_sha.setdefault(topic_id, None)  # read, and not in the table

    def lookup(self, topic_id: str) -> tuple[Topic | None, str | None]:
        if topic_id not in self.last_sha:
            self.prefetch([topic_id])
        return super().lookup(topic_id)

    def write(self, effect: Effect, body_sha256: str, entry_id: int) -> None:
        super().write(effect, body_sha256, entry_id)
        for _, after in effect.changes:
            self._changed[after["topic_id"]] = after

    def flush(self) -> None:
        """Write every changed topic (its final state) to the table."""
        self.conn.executemany(UPSERT, map(row_values, self._changed.values()))
        self._changed.clear()


PARTITION_SQL: Final = "coalesce(unicode(substr({}, -1)), 0) % ? = ?"
"""SQL that is true for the topic ids of a :class:`Partition` (parameters: its count, its number)."""


class Misrouted(Exception):
    """An entry's recorded ``topic_id`` is not the topic its body names: partitions cannot be trusted."""


class Share(Protocol):
    """Which part of the log a replay takes: a filter on the log's columns, then on each event."""

    @property
    def where(self) -> str:
        """An SQL condition on ``audit_log``, with :attr:`params`: rows it leaves out are not read."""
        ...

    @property
    def params(self) -> tuple[object, ...]: ...

    def share(
        self, event: models.TopicEvent, recorded_topic: str | None, entry_id: int
    ) -> models.TopicEvent | None:
        """The part of ``event`` to replay, or None to skip it."""
        ...


@dataclass(frozen=True, slots=True)
class Partition:
    """Partition ``number`` of ``count``: the topics whose id ends in a character equal to ``number``
    modulo ``count`` (as :data:`PARTITION_SQL`). Topics never interact, so replaying each partition apart
    gives the same rows as one replay; only a destroy may name topics of several partitions, and each
    partition replays the part naming its own."""

    number: int
    count: int

    @property
    def where(self) -> str:  # the receiver records the topic of every one-topic event: filter on it
        return f"(topic_id IS NULL OR {PARTITION_SQL.format('topic_id')})"

    @property
    def params(self) -> tuple[object, ...]:
        return (self.count, self.number)

    def holds(self, topic_id: str) -> bool:
        return (ord(topic_id[-1]) if topic_id else 0) % self.count == self.number

    def share(
        self, event: models.TopicEvent, recorded_topic: str | None, entry_id: int
    ) -> models.TopicEvent | None:
        ids = topic_ids(event)
        if recorded_topic is not None:  # one topic, and the query picked it by this recorded id
            if ids != [recorded_topic]:
                raise Misrouted(f"entry {entry_id} records topic {recorded_topic!r} but its body names {ids}")
            return event if self.holds(recorded_topic) else None
        return only(event, [t for t in ids if self.holds(t)])


def only(event: models.TopicEvent, ids: list[str]) -> models.TopicEvent | None:
    """``event`` restricted to the topics ``ids`` (a subset of :func:`topic_ids`), None if empty."""
    if not ids:
        return None
    if isinstance(event, models.AfterTopicDestroyed) and len(ids) < len(event.TopicIdList):
        return msgspec.structs.replace(event, TopicIdList=ids)
    return event


@dataclass(frozen=True, slots=True)
class Difference:
    """A topic whose row in the table is not its replayed row."""

    topic_id: str
    replayed: Topic | None
    """None: the table has a topic the log does not."""
    stored: tuple[Any, ...] | None
    """The row in the table (in :data:`COLUMNS` order), None when it is missing."""


def differences(
    conn: sqlite3.Connection, replayed: dict[str, Topic], part: Partition | None = None
) -> list[Difference]:
    """Every topic (of ``part``, or all) whose row in ``topics`` differs from ``replayed``, in key order."""
    where, params = "", tuple[object, ...]()
    if part is not None:
        where, params = f" WHERE {PARTITION_SQL.format('topic_id')}", part.params
    pending, values = dict(replayed), row_values
    found = []
    for row in conn.execute(f"SELECT {', '.join(COLUMNS)} FROM topics{where}", params):
        mine = pending.pop(row[0], None)
        if mine is None or values(mine) != row:
            found.append(Difference(row[0], mine, row))
    found.extend(Difference(topic_id, row, None) for topic_id, row in pending.items())
    return sorted(found, key=operator.attrgetter("topic_id"))


@dataclass(slots=True)
class Mismatch:
    """An accepted entry that, replayed, would not be accepted (the log and its outcomes disagree)."""

    entry_id: int
    replayed_outcome: str


def replay(
    conn: sqlite3.Connection,
    store: MemoryStore | None = None,
    after_id: int = 0,
    share: Share | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[MemoryStore, list[Mismatch], int]:
    """Replay the accepted entries after ``after_id``, in order, into ``store`` (a new one by default).

    With ``share`` only its part of the log is replayed (a :class:`Partition` of the topics, say).
    ``progress`` is called with the id reached, every few thousand entries. Returns the store, the
    entries whose replay (of their share) was not ``accepted``, and the last id replayed.
    """
    with paused_gc():
        return _replay(conn, store if store is not None else MemoryStore(), after_id, share, progress)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """For passes over the whole log: millions of short-lived rows and no reference cycles, so the
    cyclic collector would only cost time (a third of a replay's)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _replay(
    conn: sqlite3.Connection,
    store: MemoryStore,
    after_id: int,
    share: Share | None,
    progress: Callable[[int], None] | None,
) -> tuple[MemoryStore, list[Mismatch], int]:
    mismatches: list[Mismatch] = []
    last_id = after_id
    where, params = ("", (after_id,)) if share is None else (f" AND {share.where}", (after_id, *share.params))
    # NOT INDEXED: one pass in id order. The outcome index would need the accepted entries sorted by
    # id afterwards (seconds on a million entries before the first row).
    rows = conn.execute(_replayed(conn, where), params)
    for count, (entry_id, at, command, body, sha, recorded_topic) in enumerate(rows, 1):
        if progress is not None and not count % 5000:
            progress(entry_id)
        try:
            event = parse_event(command, body)
            if share is not None:
                shared = share.share(event, recorded_topic, entry_id)
                if shared is None:
                    continue
                event = shared
            effect = project(event, entry_id, at, sha, store.lookup)
        except (KeyError, TypeError, ValueError, msgspec.MsgspecError) as exc:  # an altered log
            mismatches.append(Mismatch(entry_id, f"unreplayable ({type(exc).__name__}: {exc})"))
            continue
        if effect.outcome != "accepted":
            mismatches.append(Mismatch(entry_id, effect.outcome))
        store.write(effect, sha, entry_id)
        last_id = entry_id
    return store, mismatches, last_id


def _replayed(conn: sqlite3.Connection, where: str) -> str:
    """The query of a replay: an erased entry is replayed from its recorded effects, with
    ``erased:<id>`` as its body hash (:mod:`topic_audit.privacy.redaction`)."""
    erasures = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'erased_entries'").fetchone()
    if erasures is None:  # a log from before erasure existed
        body, sha, joined = "request_body", "request_body_sha256", ""
    else:
        body = "coalesce(e.effects, request_body)"
        sha = "CASE WHEN e.entry_id IS NULL THEN request_body_sha256 ELSE 'erased:' || a.id END"
        joined = " LEFT JOIN erased_entries e ON e.entry_id = a.id"
    return (
        f"SELECT a.id, received_at, callback_command, {body}, {sha}, topic_id FROM audit_log a NOT INDEXED"
        f"{joined} WHERE outcome = 'accepted' AND a.id > ?{where} ORDER BY a.id"
    )


def parse_event(command: str, body: object) -> models.TopicEvent:
    """A logged topic event, decoded exactly as the receiver decoded it. Whatever ``body`` holds, raises
    only :class:`msgspec.DecodeError` when it is not such an event (:func:`topic_audit.log.content.decode`),
    and KeyError for a command that is not projected."""
    return content.decode(_DECODERS[command].decode, body)


# Decoding straight into the payload type gives the same struct as the receiver's decode-then-convert
# for every body the receiver accepted (tests/test_projection.py replays every recorded outcome).
_DECODERS = {command: msgspec.json.Decoder(kind) for command, kind in models.PAYLOAD_TYPES.items()}


def stored_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Topics per state as ``topic_counts`` holds them (kept by the writer and by ``rebuild-projection``)."""
    return dict(conn.execute("SELECT state, topics FROM topic_counts").fetchall())
