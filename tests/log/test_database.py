"""The write connection and its one transaction helper: commit, roll back, keep the real error."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from topic_audit.log import database
from topic_audit.log.migrations import migrate


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    path = tmp_path / "audit.db"
    migrate(path)
    connection = database.connect(path)
    connection.execute("CREATE TABLE t (n INTEGER)")
    return connection


def count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])


def test_a_block_that_ends_is_committed(conn: sqlite3.Connection) -> None:
    with database.transaction(conn):
        conn.execute("INSERT INTO t VALUES (1)")
        assert conn.in_transaction
    assert not conn.in_transaction and count(conn) == 1


def test_a_block_that_raises_is_rolled_back_and_the_error_goes_on(conn: sqlite3.Connection) -> None:
    with pytest.raises(ZeroDivisionError), database.transaction(conn):
        conn.execute("INSERT INTO t VALUES (1)")
        _ = 1 / 0
    assert not conn.in_transaction and count(conn) == 0


def test_the_real_error_survives_a_transaction_that_sqlite_rolled_back(conn: sqlite3.Connection) -> None:
    """RAISE(ROLLBACK) ends the transaction inside SQLite, as a full disk or an I/O error does: the
    caller must see that error, not "cannot rollback - no transaction is active"."""
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON t BEGIN SELECT RAISE(ROLLBACK, 'refused here'); END")
    with pytest.raises(sqlite3.IntegrityError, match="refused here"), database.transaction(conn):
        conn.execute("INSERT INTO t VALUES (1)")
    assert not conn.in_transaction and count(conn) == 0


def test_immediate_takes_the_write_lock_at_once(conn: sqlite3.Connection, tmp_path: Path) -> None:
    other = sqlite3.connect(tmp_path / "audit.db", isolation_level=None, timeout=0)
    try:
        # Nothing written yet, and the lock is held:
        with database.transaction(conn), pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_deferred_is_one_snapshot(conn: sqlite3.Connection, tmp_path: Path) -> None:
    other = database.connect(tmp_path / "audit.db")
    try:
        with database.transaction(conn, "DEFERRED"):
            assert count(conn) == 0
            other.execute("INSERT INTO t VALUES (1)")  # committed meanwhile by another connection
            assert count(conn) == 0
        assert count(conn) == 1
    finally:
        other.close()


def test_the_write_connection_is_durable(conn: sqlite3.Connection, tmp_path: Path) -> None:
    assert database.durability(conn) == (2, 1000, "wal")
    replicated = database.connect(tmp_path / "audit.db", autocheckpoint=False)
    try:
        assert database.durability(replicated) == database.Durability(2, 0, "wal")
    finally:
        replicated.close()


def test_the_head_of_an_empty_log_is_genesis(conn: sqlite3.Connection) -> None:
    assert database.head(conn) == (0, "0" * 64)
