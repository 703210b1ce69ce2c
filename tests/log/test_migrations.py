"""The schema: migrations apply cleanly, and audit_log stays append-only after every one of them
(tests/log/test_upgrade.py upgrades a populated log through each of them)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlite_utils import Database
from topic_audit.log import chain
from topic_audit.log.migrations import migrate, migrations, pending


def triggers(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    finally:
        conn.close()


def test_triggers_exist_after_every_migration(tmp_path: Path) -> None:
    names = [m.name for m in migrations._migrations]
    for i, name in enumerate(names):
        path = tmp_path / f"upto-{i}.db"
        db = Database(path)
        later = names[i + 1 :]
        migrations.apply(db, stop_before=later[0] if later else None)
        assert [a.name for a in migrations.applied(db)] == names[: i + 1], name
        db.close()
        assert {"audit_log_no_update", "audit_log_no_delete", "audit_log_append_only"} <= triggers(path), (
            f"after {name}"
        )


def test_migrate_is_idempotent_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    migrate(path)
    migrate(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = [r[1] for r in conn.execute("PRAGMA table_info(audit_log)")]
    finally:
        conn.close()
    assert tuple(columns) == chain.COLUMNS


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET outcome = 'accepted'",
        "UPDATE audit_log SET detail = 'edited' WHERE id = 1",
        "DELETE FROM audit_log WHERE id = 1",
        "DELETE FROM audit_log",
        "INSERT OR REPLACE INTO audit_log SELECT * FROM audit_log WHERE id = 1",
        "REPLACE INTO audit_log SELECT * FROM audit_log WHERE id = 1",
        "INSERT INTO audit_log SELECT * FROM audit_log WHERE id = 1",
        "INSERT INTO audit_log (id, received_at, method, path, query_string, request_headers,"
        " request_body_sha256, request_body_bytes, status_code, response_body, outcome, prev_hash, entry_hash)"
        " SELECT 3, received_at, method, path, query_string, request_headers, request_body_sha256,"
        " request_body_bytes, status_code, response_body, outcome, prev_hash, entry_hash FROM audit_log",
    ],
)
def test_update_and_delete_are_refused(tmp_path: Path, statement: str) -> None:
    path = tmp_path / "a.db"
    migrate(path)
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO audit_log (id, received_at, method, path, query_string, request_headers, request_body_sha256,"
        " request_body_bytes, status_code, response_body, outcome, prev_hash, entry_hash)"
        " VALUES (1, 'now', 'POST', '/callback', '', '{}', '', 0, 200, '{}', 'ignored', '', 'h')"
    )
    conn.commit()
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute(statement)
    conn.close()


def test_pending_says_whether_migrate_has_anything_to_do_and_writes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    assert pending(db) and not db.exists()  # a new database: created by migrate, not by the question
    migrations.apply(Database(db), stop_before="m018_cluster_intake")  # a log from before an upgrade
    assert pending(db)
    size = db.stat().st_size
    assert pending(db) and db.stat().st_size == size
    migrate(db)
    assert not pending(db)
