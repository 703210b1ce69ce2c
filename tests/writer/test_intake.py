"""The append of cluster mode's intake messages: each applied exactly once, each stream in order, a second
copy of a message (a receiver's publish retried on the other stream) recorded but not appended -- all in
the transaction of the entries, so that a writer resuming from the log resumes exactly where it was."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_row
from topic_audit.integrity import verify
from topic_audit.log import database
from topic_audit.log.migrations import migrate
from topic_audit.writer import append
from topic_audit.writer.requests import Append, Intake, OutOfOrder

SALT = bytes(range(32))


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    db = tmp_path / "audit.db"
    migrate(db)
    connection = database.connect(db)
    try:
        yield connection
    finally:
        connection.close()


def message(n: int, stream: str, seq: int, after: int, msg_id: str | None = None) -> Append:
    return Append(make_row(n), intake=Intake(stream, seq, after, msg_id or f"m{n}", SALT))


def intake(conn: sqlite3.Connection) -> list[tuple[str, int, str, int | None]]:
    return list(conn.execute("SELECT stream, seq, msg_id, entry_id FROM cluster_intake ORDER BY id"))


def test_messages_of_two_streams_are_applied_in_one_order_each_once(conn: sqlite3.Connection) -> None:
    done = append.commit(conn, [message(1, "A", 1, 0), message(2, "B", 1, 0), message(3, "A", 2, 1)])
    assert [c.id for c in done.committed] == [1, 2, 3]
    assert intake(conn) == [("A", 1, "m1", 1), ("B", 1, "m2", 2), ("A", 2, "m3", 3)]
    assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 3


def test_a_second_copy_is_recorded_and_answered_as_the_first_not_appended(conn: sqlite3.Connection) -> None:
    first = append.commit(conn, [message(1, "A", 1, 0, "same")])
    again = append.commit(conn, [message(1, "B", 1, 0, "same"), message(2, "B", 2, 1)])
    assert again.committed[0] == first.committed[0]
    assert [c.id for c in again.committed] == [1, 2]
    assert intake(conn) == [("A", 1, "same", 1), ("B", 1, "same", None), ("B", 2, "m2", 2)]
    # within one transaction too
    both = append.commit(conn, [message(3, "A", 2, 1, "twice"), message(3, "B", 3, 2, "twice")])
    assert both.committed[0] == both.committed[1]
    assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 3


@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param((2, 1, "A"), id="applied already"),
        pytest.param((4, 2, "A"), id="one skipped"),
        pytest.param((3, 1, "A"), id="after the wrong one"),
        pytest.param((2, 0, "B"), id="the other stream's first, after nothing it had"),
    ],
)
def test_a_message_out_of_order_refuses_its_whole_group(
    conn: sqlite3.Connection, wrong: tuple[int, int, str]
) -> None:
    append.commit(conn, [message(1, "A", 1, 0), message(2, "A", 2, 1), message(3, "B", 1, 0)])
    seq, after, stream = wrong
    with pytest.raises(OutOfOrder):
        append.commit(conn, [message(9, "A", 3, 2), message(10, stream, seq, after)])
    assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 3, "nothing of the group committed"
    assert len(intake(conn)) == 3
    append.commit(conn, [message(9, "A", 3, 2)])  # the loop starts again from the log: it follows
    assert [row[:2] for row in intake(conn)] == [("A", 1), ("A", 2), ("B", 1), ("A", 3)]


def test_the_intake_is_append_only(conn: sqlite3.Connection) -> None:
    append.commit(conn, [message(1, "A", 1, 0)])
    for statement in ("UPDATE cluster_intake SET seq = 7", "DELETE FROM cluster_intake"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(statement)
    assert verify.verify_chain(conn)[0] == []


def test_a_message_whose_lease_lapsed_before_its_commit_is_refused(conn: sqlite3.Connection) -> None:
    lapsed = Append(make_row(1), intake=Intake("A", 1, 0, "m1", SALT, valid_until=time.monotonic() - 0.001))
    with pytest.raises(OutOfOrder, match="lease"):
        append.commit(conn, [lapsed])
    assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 0
    confirmed = Intake("A", 1, 0, "m1", SALT, valid_until=time.monotonic() + 5)
    append.commit(conn, [Append(make_row(1), intake=confirmed)])
    assert intake(conn) == [("A", 1, "m1", 1)]
