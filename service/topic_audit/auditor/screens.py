"""The auditor's screens in Datasette: what the list and the one-callback page need beyond Datasette's own
context, as a small Datasette plugin (pluggy hooks; :mod:`topic_audit.auditor.explore` registers it).

- Template filters: ``pretty_json`` (JSON indented, anything else as it is), ``json_items`` (a JSON
  object's members, for the request headers), ``query_params`` (a query string's parameters),
  ``list_cell`` (a list cell: long text shortened, linked to the field on the row's own page) and
  ``row_link`` (that page's address).
- The salts of the keyed commitments (``content_keys.salt``) read as NULL through Datasette, whatever
  the SQL; in the ``audit_log`` list an erased entry's outcome says "erased".
- ``callback`` on the page of one ``audit_log`` entry: the erasure record that erased it, its place in the log (the entries before and
  after), the topics it is about (with what it did to them in the projection), its delivery attempts
  and its outbox state. Every query reads by primary key or by the ``deliveries.audit_id`` index.

The pages themselves are templates in ``dashboard/templates``.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import pluggy
from datasette.utils import tilde_encode
from markupsafe import Markup, escape

from topic_audit.log import content

hookimpl = pluggy.HookimplMarker("datasette")

DATABASE_NAME = "audit"
SHORT_CELL = 48
"""Characters of a long text shown in a list cell; the rest is one click away, on the row's page."""
TITLE_CHARS = 1000
"""Characters of a shortened value shown when hovering over it."""
MAX_DELIVERIES = 100
"""Delivery attempts listed on a callback's page; the rest are linked."""

_HREF = re.compile(r'href="([^"]+)"')


def pretty_json(value: object) -> str:
    """A JSON object or array indented by two spaces (members in their order, non-ASCII as is); any
    other value (not JSON -- nested too deep, cut short, ``NaN`` --, a scalar, bytes that are not UTF-8)
    as it is. Whatever anyone sent, never raises (:func:`topic_audit.log.content.parse_json`)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return f"<{len(value):,} bytes, not UTF-8>"
    text = "" if value is None else str(value)
    parsed = content.parse_json(text)
    if not isinstance(parsed, dict | list):
        return text
    return _dumps(parsed, indent=2) or text


def json_items(value: object) -> list[tuple[str, str]]:
    """The members of a JSON object, values as text (JSON for nested ones); empty for anything else."""
    parsed = content.parse_json(value)
    if not isinstance(parsed, dict):
        return []
    return [(k, v if isinstance(v, str) else _dumps(v) or "") for k, v in parsed.items()]


def _dumps(value: object, indent: int | None = None) -> str | None:
    """``value`` (as :func:`topic_audit.log.content.parse_json` gives it) as JSON text; None when it cannot
    be written (nested deeper than the writer goes from here)."""
    try:
        return json.dumps(value, indent=indent, ensure_ascii=False)
    except (RecursionError, ValueError):
        return None


def query_params(query: object) -> list[tuple[str, str]]:
    """The parameters of a query string, in their order, decoded (blank values kept)."""
    return parse_qsl(query, keep_blank_values=True) if isinstance(query, str) else []


def row_link(row: Any) -> str | None:
    """The address of a list row's own page (from Datasette's link cell), or None (views, queries)."""
    for cell in row:
        if cell.get("value_type") == "pk":
            match = _HREF.search(str(cell["value"]))
            return match.group(1) if match else None
    return None


def list_cell(cell: Mapping[str, Any], row_url: str | None = None, limit: int = SHORT_CELL) -> Markup:
    """A list cell: text longer than ``limit`` is shortened, with the start of it as a tooltip and a link
    to the field on the row's page; links, blobs and short values as Datasette renders them."""
    value, raw = cell["value"], cell["raw"]
    if isinstance(value, Markup) or not isinstance(raw, str):
        return escape(value)
    if len(raw) <= limit:  # whole, but the list's column may still be too narrow for it
        return Markup('<span title="{}">{}</span>').format(raw, raw) if len(raw) > 16 else escape(value)
    short, title = raw[:limit] + "\u2026", raw[:TITLE_CHARS]
    if row_url is None:
        return Markup('<span class="shortened" title="{}">{}</span>').format(title, short)
    return Markup('<a class="shortened" href="{}#{}" title="{}">{}</a>').format(
        row_url, cell["column"], title, short
    )


def topics_of(topic_id: str | None, body: object) -> list[str]:
    """The topics an entry is about: its ``topic_id``, or a multi-topic destroy's ``TopicIdList``."""
    if topic_id:
        return [topic_id]
    parsed = content.parse_json(body)
    listed = parsed.get("TopicIdList") if isinstance(parsed, dict) else None
    return [t for t in listed if isinstance(t, str)] if isinstance(listed, list) else []


async def callback_page(db: Any, entry_id: int) -> dict[str, Any]:
    """What one entry's page shows besides the entry itself (see the module docstring)."""
    entry = (
        await db.execute(
            "SELECT topic_id, request_body, (SELECT max(id) FROM audit_log) AS last_id "
            "FROM audit_log WHERE id = ?",
            [entry_id],
        )
    ).first()
    if entry is None:
        return {}
    deliveries = await db.execute(
        "SELECT id, destination, kind, attempt, started_at, status_code, error, detail, response_body, "
        "elapsed_ms, replay FROM deliveries WHERE audit_id = ? ORDER BY id LIMIT ?",
        [entry_id, MAX_DELIVERIES + 1],
    )
    outbox = await db.execute(
        "SELECT destination, state, attempts, step, next_attempt_at, last_error, replay, queued_at, "
        "updated_at FROM outbox WHERE audit_id = ? ORDER BY destination",
        [entry_id],
    )
    attempts = [dict(r) for r in deliveries.rows]
    return {
        "erasure": await _erasure(db, entry_id),
        "prev_id": entry_id - 1 if entry_id > 1 else None,
        "next_id": entry_id + 1 if entry_id < entry["last_id"] else None,
        "topics": await _topics(db, topics_of(entry["topic_id"], entry["request_body"]), entry_id),
        "deliveries": attempts[:MAX_DELIVERIES],
        "more_deliveries": len(attempts) > MAX_DELIVERIES,
        "outbox": [dict(r) for r in outbox.rows],
    }


async def _erasure(db: Any, entry_id: int) -> dict[str, Any] | None:
    """The erasure record that erased this entry's content, or None (also before erasure existed)."""
    if not await db.table_exists("erased_entries"):
        return None
    row = (
        await db.execute(
            "SELECT e.id, e.erased_at, e.cause, e.reason FROM erased_entries x "
            "JOIN erasures e ON e.id = x.erasure_id WHERE x.entry_id = ?",
            [entry_id],
        )
    ).first()
    return None if row is None else dict(row)


async def _topics(db: Any, ids: list[str], entry_id: int) -> list[dict[str, Any]]:
    """Each topic with its name in the projection and what this entry did to it there (by primary key:
    Datasette's own count of the topics rows pointing at the entry scans the table)."""
    out = []
    for topic_id in ids[:MAX_DELIVERIES]:
        row = (
            await db.execute(
                "SELECT name, created_entry_id, updated_entry_id, deleted_entry_id FROM topics "
                "WHERE topic_id = ?",
                [topic_id],
            )
        ).first()
        did = (
            []
            if row is None
            else [w for w in ("created", "updated", "deleted") if row[f"{w}_entry_id"] == entry_id]
        )
        out.append(
            {
                "id": topic_id,
                "name": None if row is None else row["name"],
                "known": row is not None,
                "did": did,
            }
        )
    return out


@hookimpl
def prepare_jinja2_environment(env: Any) -> None:
    env.filters.update(
        pretty_json=pretty_json,
        json_items=json_items,
        query_params=query_params,
        row_link=row_link,
        list_cell=list_cell,
        tilde_encode=tilde_encode,
    )


def _refuse_salts(action: int, table: str | None, column: str | None, *_: object) -> int:
    """SQLite authorizer: a read of ``content_keys.salt`` gives NULL (the salts never leave the file)."""
    if action == sqlite3.SQLITE_READ and table == "content_keys" and column == "salt":
        return sqlite3.SQLITE_IGNORE
    return sqlite3.SQLITE_OK


@hookimpl
def prepare_connection(conn: sqlite3.Connection, database: str) -> None:
    if database == DATABASE_NAME:
        conn.set_authorizer(_refuse_salts)


@hookimpl
def render_cell(value: object, column: str, table: str | None, database: str, row: Any) -> Markup | None:
    """In the list, an entry whose content is erased says so beside its outcome (an erased entry's
    ``request_body_sha256`` is empty; a live one's never is)."""
    if database != DATABASE_NAME or table != "audit_log" or column != "outcome":
        return None
    try:
        erased = row["request_body_sha256"] == ""
    except (IndexError, KeyError):
        return None
    return (
        Markup('{} <span class="erased" title="content erased">erased</span>').format(value)
        if erased
        else None
    )


@hookimpl
def extra_template_vars(
    view_name: str, database: str | None, table: str | None, request: Any, datasette: Any
) -> Callable[[], Awaitable[dict[str, Any]]] | dict[str, Any]:
    if view_name != "row" or database != DATABASE_NAME or table != "audit_log" or request is None:
        return {}
    try:
        entry_id = int(request.url_vars["pks"])
    except (KeyError, ValueError):
        return {}

    async def context() -> dict[str, Any]:
        return {"callback": await callback_page(datasette.get_database(database), entry_id)}

    return context
