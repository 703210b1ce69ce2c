"""What the projection sees of an erased entry, and the replay of the topics an erasure touched.

``erased_entries.effects`` holds, for an erased topic event, its body with the evidence kept (command,
group and topic ids, type, event time) and every content field it carried replaced by ``""``: replayed,
it sets the same fields as the original did, to an erased value. So erased values are written as such in
``topics`` -- an empty string where a topic's text or account came from an erased entry -- while the
topic keeps its id, group and times, and the projection stays a replay of the log
(:func:`topic_audit.log.projection.replay` reads the effects in place of an erased body).

An erased entry's body hash is gone; replays use ``erased:<id>`` in its place, which equals no other
entry's, so that no later event is taken for a redelivery of an erased one.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any, Final

from topic_audit.log import content, projection, search
from topic_audit.tencent import models

PROJECTED: Final = (models.AFTER_CREATE, models.AFTER_INFO_CHANGED, models.AFTER_DESTROYED)
EVIDENCE_FIELDS: Final = ("CallbackCommand", "GroupId", "TopicId", "TopicIdList", "Type", "EventTime")
_CONTENT_FIELDS: Final = frozenset(
    name
    for kind in models.PAYLOAD_TYPES.values()
    for name in kind.__struct_fields__
    if name not in EVIDENCE_FIELDS and name != "UserDefinedDataList"
)


def erased_sha(entry_id: int) -> str:
    return f"erased:{entry_id}"


def effects(command: str | None, body: object) -> str | None:
    """The evidence of a topic event's body that its replay needs (see the module docstring); None for
    any other body, whatever bytes it holds (:func:`topic_audit.log.content.parse_json`)."""
    if command not in PROJECTED or body is None:
        return None
    decoded = content.parse_json(body)
    if not isinstance(decoded, dict):
        return None
    try:
        projection.parse_event(command, body)  # only bodies the receiver could have projected
    except ValueError:  # msgspec.DecodeError
        return None
    kept: dict[str, Any] = {k: decoded[k] for k in EVIDENCE_FIELDS if k in decoded}
    for key, value in decoded.items():
        if key in kept or value is None:
            continue
        if key == "UserDefinedDataList" and isinstance(value, list):
            kept[key] = [{"Key": item.get("Key"), "Value": ""} for item in value if isinstance(item, dict)]
        elif key in _CONTENT_FIELDS:
            kept[key] = ""
    return json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def touched_topics(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The topics the entries ``rows`` (``topic_id``, ``callback_command``, ``request_body``) changed."""
    touched: set[str] = set()
    for row in rows:
        if row["topic_id"] is not None:
            touched.add(row["topic_id"])
        elif row["callback_command"] == models.AFTER_DESTROYED and row["request_body"] is not None:
            try:
                event = projection.parse_event(models.AFTER_DESTROYED, row["request_body"])
            except ValueError:  # msgspec.DecodeError: not a destroy, whatever it holds
                continue
            touched.update(projection.topic_ids(event))
    return sorted(touched)


def replay_topics(conn: sqlite3.Connection, rows: Iterable[dict[str, Any]]) -> bool:
    """Replay the topics the entries ``rows`` touched, in the caller's transaction, and write back (and
    re-index in ``topics_fts``) those whose row changed; whether any did."""
    ids = touched_topics(rows)
    if not ids:
        return False
    store, wanted = projection.MemoryStore(), set(ids)
    marks = ", ".join("?" * len(ids))
    # Two indexed reads, not one OR (which SQLite answers with a scan of the log): the topics' own
    # events by topic_id, and the destroys naming several topics by their partial index.
    columns = (
        "SELECT a.id, a.received_at, a.callback_command, coalesce(e.effects, a.request_body), "
        "e.entry_id IS NOT NULL, a.request_body_sha256 FROM audit_log a "
        "LEFT JOIN erased_entries e ON e.entry_id = a.id WHERE +a.outcome = 'accepted' AND "
    )
    entries = conn.execute(
        f"{columns} a.topic_id IN ({marks}) UNION ALL "
        f"{columns} a.callback_command = ? AND a.topic_id IS NULL ORDER BY 1",
        [*ids, models.AFTER_DESTROYED],
    )
    for entry_id, at, command, body, erased, sha in entries:
        if body is None:
            continue
        sha = erased_sha(entry_id) if erased else sha
        try:
            parsed = projection.parse_event(command, body)
            event = projection.only(parsed, [t for t in projection.topic_ids(parsed) if t in wanted])
            if event is None:
                continue
            effect = projection.project(event, entry_id, at, sha, store.lookup)
        except (KeyError, TypeError, ValueError):  # an altered entry: skipped as a replay skips it
            continue
        store.write(effect, sha, entry_id)
    stored = {
        row[0]: row
        for row in conn.execute(
            f"SELECT {', '.join(projection.COLUMNS)} FROM topics WHERE topic_id IN ({marks})", ids
        )
    }
    changed = [
        row for topic_id, row in store.rows.items() if stored.get(topic_id) != projection.row_values(row)
    ]
    if not changed:
        return False
    conn.executemany(projection.UPSERT, map(projection.row_values, changed))
    changed_ids = [row["topic_id"] for row in changed]
    marks = ", ".join("?" * len(changed_ids))
    search.retext_topics(conn, f"topic_id IN ({marks})", changed_ids)
    return True
