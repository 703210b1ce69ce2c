r"""Which log entries hold a data subject's values: the selectors of ``topic-audit erase``.

- ``account``: any ``*_Account`` field anywhere in the body (operator, owner, sender, receiver, members…);
- ``ip``: the end user's ``ClientIP`` (the ``client_ip`` column, which the receiver reads from the query);
- ``topic``: the entries naming the topic (its own events, and destroys that list it);
- ``id`` / ``range``: entries by id.

Bodies are searched with ``instr`` (one pass in SQLite, no index to keep) and each candidate is then
checked exactly on its parsed JSON, so a value that only appears inside another is not taken. JSON may
write any character of a string as an escape (``\u00e9``, ``\"``, ``\/``): a body that holds the value
in none of its strings literally holds a backslash, so the bodies holding either are the candidates, and
the decoded JSON decides (:data:`_CANDIDATE`). Entries already erased are never selected again.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec

from topic_audit import models

KINDS: Final = ("account", "ip", "topic", "id", "range", "older")
_NOT_ERASED: Final = "id NOT IN (SELECT entry_id FROM erased_entries)"
_CANDIDATE: Final = "(instr(request_body, ?) > 0 OR instr(request_body, '\\') > 0)"
"""A body that may name the value: it holds it as written, or an escape that may spell it."""
_DURATION: Final = re.compile(r"^\s*(\d+)\s*([dhms])\s*$")
_UNITS: Final = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


@dataclass(frozen=True, slots=True)
class Selector:
    kind: str
    value: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown selector {self.kind!r} (one of {', '.join(KINDS)})")
        if not self.value:
            raise ValueError(f"--{self.kind} needs a value")


def parse_duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``2s``."""
    found = _DURATION.match(text)
    if found is None:
        raise ValueError(f"not a duration: {text!r} (a number and d, h, m or s: 90d, 12h, 30m, 2s)")
    return timedelta(**{_UNITS[found[2]]: int(found[1])})


def horizon(older_than: timedelta, now: datetime | None = None) -> str:
    """The ``received_at`` before which entries are older than ``older_than``."""
    moment = (now or datetime.now(UTC)) - older_than
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def select(conn: sqlite3.Connection, selector: Selector) -> Iterator[int]:
    """The ids of the entries, not yet erased, that ``selector`` picks, ascending."""
    kind, value = selector.kind, selector.value
    if kind == "id":
        yield from _ids(conn, "id = ?", (_int(value),))
    elif kind == "range":
        first, _, last = value.partition("-")
        yield from _ids(conn, "id BETWEEN ? AND ?", (_int(first), _int(last)))
    elif kind == "older":
        yield from _ids(conn, "received_at < ?", (value,))
    elif kind == "ip":
        yield from _ids(conn, "client_ip = ?", (value,))
    elif kind == "topic":
        # topic_id holds the decoded id; the destroys that list several topics are decoded here.
        candidates = conn.execute(
            f"SELECT id, topic_id, request_body FROM audit_log WHERE {_NOT_ERASED} AND (topic_id = ? OR "
            f"(callback_command = ? AND topic_id IS NULL AND {_CANDIDATE})) ORDER BY id",
            (value, models.AFTER_DESTROYED, value),
        )
        for entry_id, topic_id, body in candidates:
            if topic_id == value or value in _topic_list(body):
                yield entry_id
    else:
        candidates = conn.execute(
            f"SELECT id, request_body FROM audit_log WHERE {_NOT_ERASED} AND {_CANDIDATE} ORDER BY id",
            (value,),
        )
        for entry_id, body in candidates:
            if value in set(accounts(body)):
                yield entry_id


def accounts(body: str | bytes | None) -> Iterator[str]:
    """Every value of a ``*_Account`` key anywhere in the JSON ``body``."""
    try:
        decoded = msgspec.json.decode(body) if body is not None else None
    except msgspec.MsgspecError:
        return
    stack: list[Any] = [decoded]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if isinstance(key, str) and key.endswith("_Account") and isinstance(value, str):
                    yield value
                elif isinstance(key, str) and key.endswith("_Account") and isinstance(value, list):
                    yield from (v for v in value if isinstance(v, str))  # a list of accounts
                elif isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _topic_list(body: str | bytes | None) -> list[str]:
    try:
        decoded = msgspec.json.decode(body) if body is not None else None
    except msgspec.MsgspecError:
        return []
    if not isinstance(decoded, dict) or decoded.get("CallbackCommand") != models.AFTER_DESTROYED:
        return []
    found = decoded.get("TopicIdList")
    return [t for t in found if isinstance(t, str)] if isinstance(found, list) else []


def _ids(conn: sqlite3.Connection, where: str, params: tuple[object, ...]) -> Iterator[int]:
    for (entry_id,) in conn.execute(
        f"SELECT id FROM audit_log WHERE {where} AND {_NOT_ERASED} ORDER BY id", params
    ):
        yield int(entry_id)


def _int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"not an entry id: {text!r}") from None
    if number < 1:
        raise ValueError(f"not an entry id: {text!r}")
    return number
