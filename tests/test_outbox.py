"""The outbox and the deliveries chain on a real SQLite file (no HTTP): rounds, the schedule, replays."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from topic_audit import outbox, samples
from topic_audit.migrations import migrate
from topic_audit.writer import connect

AT = "2026-11-25T10:00:00.000Z"
URL = "http://app.example/cb"


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    db = tmp_path / "audit.db"
    migrate(db)
    conn = connect(db)
    conn.execute(
        "INSERT INTO audit_log (id, received_at, method, path, query_string, request_headers, request_body, "
        "request_body_sha256, request_body_bytes, status_code, response_body, outcome, prev_hash, entry_hash) "
        "VALUES (1, ?, 'POST', '/callback', '', '{}', ?, '', 0, 200, '', 'accepted', '', '')",
        (AT, json.dumps(samples.sample("after-create"))),
    )
    conn.execute("BEGIN IMMEDIATE")
    outbox.queue(conn, [(1, URL, AT)], 0)
    conn.execute("COMMIT")
    return conn


def attempt(due: outbox.Due, delivered: bool) -> outbox.Attempt:
    return outbox.Attempt(
        due.audit_id,
        due.destination,
        "after",
        due.attempts + 1,
        AT,
        1.0,
        200 if delivered else 500,
        None if delivered else "http_error",
        None if delivered else "HTTP 500",
        None,
        due.replay,
        due.queued_at,
    )


def state(conn: sqlite3.Connection) -> tuple[str, int, int]:
    return conn.execute("SELECT state, attempts, step FROM outbox").fetchone()


def test_the_schedule_then_failed(conn: sqlite3.Connection) -> None:
    for n in (1, 2, 3):
        (due,) = outbox.due(conn, URL, "2100-01-01", 10)
        exhausted = outbox.record(conn, [attempt(due, False)], (0, 5, 300), AT)
        assert state(conn) == (("pending" if n < 3 else "failed"), n, n)
        assert len(exhausted) == (n == 3)
    assert outbox.due(conn, URL, "2100-01-01", 10) == []
    assert [r[0] for r in conn.execute("SELECT attempt FROM deliveries")] == [1, 2, 3]


def test_a_replay_queued_during_an_attempt_is_not_overwritten_by_it(conn: sqlite3.Connection) -> None:
    (due,) = outbox.due(conn, URL, "2100-01-01", 10)
    conn.execute("BEGIN IMMEDIATE")
    outbox.queue(conn, [(1, URL, "2026-11-25T10:00:05.000Z")], 0, replay=1)  # `replay --id 1` meanwhile
    conn.execute("COMMIT")
    outbox.record(conn, [attempt(due, True)], (0, 5), AT)  # the first attempt ends afterwards
    assert state(conn)[0] == "pending"  # the replay still stands
    (again,) = outbox.due(conn, URL, "2100-01-01", 10)
    assert again.replay == 1
    outbox.record(conn, [attempt(again, True)], (0, 5), AT)
    assert state(conn)[0] == "delivered"
    assert conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 2  # both attempts recorded


def test_skipped_entries_are_not_due(conn: sqlite3.Connection) -> None:
    assert outbox.due(conn, URL, "2100-01-01", 10, skip=[1]) == []
    assert outbox.next_due(conn, URL) is not None
    assert outbox.verify_chain(conn)[0] == []
