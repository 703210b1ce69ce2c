r"""Which log entries hold a data subject's values: the selectors of ``topic-audit erase``.

- ``account``: any ``*_Account`` field anywhere in the body (operator, owner, sender, receiver, members…);
- ``ip``: the end user's ``ClientIP`` (the ``client_ip`` column, which the receiver reads from the query),
  and any query string that holds the address (a repeated or oddly written ``ClientIP``);
- ``topic``: the entries naming the topic (its own events, destroys that list it, and any other body
  whose ``TopicId`` or ``TopicIdList`` names it: a rejected one holds its texts just as well);
- ``id`` / ``range``: entries by id.

Bodies are searched with ``instr`` (one pass in SQLite, no index to keep) and each candidate is then
checked exactly on its parsed JSON, so a value that only appears inside another is not taken. JSON may
write any character of a string as an escape (``\u00e9``, ``\"``, ``\/``): a body that holds the value
in none of its strings literally holds a backslash, so the bodies holding either are the candidates, and
the decoded JSON decides (:data:`_CANDIDATE`). Entries already erased are never selected again.

A body that is not JSON (cut short, nested too deep, not UTF-8 -- whatever anyone sent) cannot be read
field by field, and is matched by its bytes instead (:func:`mentions`): it is selected when it holds the
value as a JSON string anywhere, under any key or none. That takes more than the exact rule would (an
account that is only some message's text), which is the safe side: an entry erased too many keeps its
evidence, one missed keeps a person's data.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import unquote_plus

import msgspec

from topic_audit import clock
from topic_audit.log import chain, content

KINDS: Final = ("account", "ip", "topic", "id", "range", "older")
_NOT_ERASED: Final = "id NOT IN (SELECT entry_id FROM erased_entries)"
_CANDIDATE: Final = "(instr(request_body, ?) > 0 OR instr(request_body, '\\') > 0)"
"""A body that may name the value: it holds it as written, or an escape that may spell it."""
_IP_CANDIDATE: Final = (
    "(client_ip = ? OR instr(query_string, ?) > 0 OR instr(query_string, '%') > 0 "
    "OR instr(query_string, '+') > 0)"
)
"""A query string that may hold the address: as written, or with escapes that may spell it."""
_STRING: Final = re.compile(rb'"((?:[^"\\]|\\.)*)("?)', re.DOTALL)
"""A JSON string in bytes that may not be JSON: its inside, and its closing quote (empty when cut off)."""
_ADDRESS_CHARS: Final = "0-9A-Za-z."
"""Characters that continue an address: the value must not be written next to one (``1.2.3.4`` is not in
``11.2.3.45``)."""
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
    return clock.of(moment)


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
        candidates = conn.execute(
            f"SELECT id, client_ip, query_string FROM audit_log WHERE {_NOT_ERASED} AND {_IP_CANDIDATE} "
            "ORDER BY id",
            (value, value),
        )
        for entry_id, client_ip, query in candidates:
            if client_ip == value or holds_address(query, value):
                yield int(entry_id)
    elif kind == "topic":
        # topic_id holds the decoded id of a one-topic event; any other entry is decided by its body.
        candidates = conn.execute(
            f"SELECT id, topic_id, request_body FROM audit_log WHERE {_NOT_ERASED} AND (topic_id = ? OR "
            f"(topic_id IS NULL AND {_CANDIDATE})) ORDER BY id",
            (value, value),
        )
        for entry_id, topic_id, body in candidates:
            if topic_id == value or names_topic(body, value):
                yield int(entry_id)
    else:
        candidates = conn.execute(
            f"SELECT id, request_body FROM audit_log WHERE {_NOT_ERASED} AND {_CANDIDATE} ORDER BY id",
            (value,),
        )
        for entry_id, body in candidates:
            if holds_account(body, value):
                yield int(entry_id)


def holds_account(body: object, account: str) -> bool:
    """Whether the stored ``body`` holds ``account`` in a ``*_Account`` field, or, when it is not JSON,
    anywhere as a JSON string (:func:`mentions`)."""
    decoded = content.parse_json(body)
    if decoded is content.NOT_JSON:
        return mentions(body, account)
    return account in set(accounts(decoded))


def names_topic(body: object, topic_id: str) -> bool:
    """Whether the stored ``body`` names ``topic_id``: as its ``TopicId`` or in its ``TopicIdList`` (a
    multi-topic destroy, or any other entry: a rejected one names it just as well), or, when it is not
    JSON, anywhere as a JSON string (:func:`mentions`)."""
    decoded = content.parse_json(body)
    if decoded is content.NOT_JSON:
        return mentions(body, topic_id)
    return topic_id in _topic_list(decoded)


def mentions(body: object, value: str) -> bool:
    """Whether ``body``, read as bytes, holds ``value`` as a JSON string: written as is (``"erin"``),
    with escapes (``"\\u0065rin"``), or cut off right after it (a body ending in ``"erin``). Bytes that
    are not JSON cannot say which field a string is: any string equal to the value counts."""
    raw = chain.body_bytes(body) if isinstance(body, str | bytes | bytearray | memoryview) else b""
    encoded = msgspec.json.encode(value)
    if encoded in raw or raw.endswith(encoded[:-1]):
        return True
    if b"\\" not in raw:
        return False
    for found in _STRING.finditer(raw):  # the strings as they pair up from the start
        if b"\\" in found[1]:  # (one without escapes was found above, closed or cut off)
            try:
                if msgspec.json.decode(b'"' + found[1] + b'"') == value:
                    return True
            except msgspec.DecodeError:
                continue
    return False


def holds_address(query: object, address: str) -> bool:
    """Whether the query string ``query`` holds ``address`` (in any parameter, as written or
    percent-decoded), not as part of a longer address; IPv6 letters in either case."""
    if not isinstance(query, str):
        return False
    pattern = re.compile(f"(?<![{_ADDRESS_CHARS}]){re.escape(address)}(?![{_ADDRESS_CHARS}])", re.IGNORECASE)
    return any(pattern.search(text) for text in (query, unquote_plus(query, encoding="latin-1")))


def accounts(decoded: object) -> Iterator[str]:
    """Every value of a ``*_Account`` key anywhere in the JSON value ``decoded`` (as
    :func:`topic_audit.log.content.parse_json` gives it)."""
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


def _topic_list(decoded: object) -> list[str]:
    """The topics a JSON body names at its top: ``TopicId`` and the members of ``TopicIdList``."""
    if not isinstance(decoded, dict):
        return []
    named = decoded.get("TopicIdList")
    found = [t for t in named if isinstance(t, str)] if isinstance(named, list) else []
    return [decoded["TopicId"], *found] if isinstance(decoded.get("TopicId"), str) else found


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
