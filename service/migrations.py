"""The schema, as named sqlite-utils migrations. The schema lives here and nowhere else.

Rules for new migrations: never ``Table.transform()`` ``audit_log`` (it drops triggers and would rewrite
the chained rows); add columns with ``ALTER TABLE … ADD COLUMN`` and list them in ``chain.COLUMNS``;
``tests/test_migrations.py`` checks the append-only triggers still exist after every migration.
"""

from __future__ import annotations

from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("topic_audit")

OUTCOMES = ("accepted", "duplicate", "ignored", "rejected", "error")


@migrations()
def m001_audit_log(db: Database) -> None:
    outcomes = ", ".join(f"'{o}'" for o in OUTCOMES)
    db.execute(
        f"""
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY,
            received_at TEXT NOT NULL,
            method TEXT NOT NULL,
            path TEXT NOT NULL,
            query_string TEXT NOT NULL,
            sdk_app_id TEXT,
            callback_command TEXT,
            client_ip TEXT,
            opt_platform TEXT,
            request_time TEXT,
            remote_addr TEXT,
            request_headers TEXT NOT NULL,
            request_body BLOB,
            request_body_sha256 TEXT NOT NULL,
            request_body_bytes INTEGER NOT NULL,
            status_code INTEGER NOT NULL,
            response_body TEXT NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ({outcomes})),
            reason TEXT,
            detail TEXT,
            topic_id TEXT REFERENCES topics(topic_id),
            group_id TEXT,
            duplicate_of INTEGER REFERENCES audit_log(id),
            elapsed_ms REAL,
            prev_hash TEXT NOT NULL,
            entry_hash TEXT NOT NULL
        )
        """
    )
    db.execute(
        "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE refused'); END"
    )
    db.execute(
        "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE refused'); END"
    )
    # Rows are only ever appended at the end, with the next id: this refuses gaps, inserts in the
    # middle, and INSERT OR REPLACE (which would delete the old row without firing the DELETE trigger).
    db.execute(
        "CREATE TRIGGER audit_log_append_only BEFORE INSERT ON audit_log "
        "WHEN NEW.id IS NOT (SELECT coalesce(max(id), 0) FROM audit_log) + 1 "
        "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: ids must continue the log'); END"
    )
    for columns in (["received_at"], ["topic_id"], ["group_id"], ["outcome", "reason"], ["callback_command"]):
        db["audit_log"].create_index(columns)  # type: ignore[union-attr]


@migrations()
def m002_topics(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE topics (
            topic_id TEXT PRIMARY KEY,
            group_id TEXT,
            name TEXT,
            type TEXT,
            owner_account TEXT,
            operator_account TEXT,
            custom_data TEXT,
            introduction TEXT,
            notification TEXT,
            face_url TEXT,
            created_at TEXT,
            created_entry_id INTEGER REFERENCES audit_log(id),
            updated_at TEXT,
            updated_entry_id INTEGER REFERENCES audit_log(id),
            deleted_at TEXT,
            deleted_entry_id INTEGER REFERENCES audit_log(id)
        )
        """
    )
    db["topics"].create_index(["group_id"])  # type: ignore[union-attr]


@migrations()
def m003_checkpoints(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE checkpoints (
            id INTEGER PRIMARY KEY,
            log_size INTEGER NOT NULL,
            head_hash TEXT NOT NULL,
            created_at TEXT NOT NULL,
            prev_digest TEXT NOT NULL,
            public_key TEXT NOT NULL,
            digest TEXT NOT NULL,
            signature TEXT NOT NULL
        )
        """
    )
    for action in ("UPDATE", "DELETE"):
        db.execute(
            f"CREATE TRIGGER checkpoints_no_{action.lower()} BEFORE {action} ON checkpoints "
            f"BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only: {action} refused'); END"
        )


@migrations()
def m004_heartbeat(db: Database) -> None:
    # One row the writer rewrites to prove the database takes durable writes (/readyz).
    db.execute("CREATE TABLE heartbeat (id INTEGER PRIMARY KEY CHECK (id = 1), at TEXT NOT NULL)")


@migrations()
def m005_search(db: Database) -> None:
    """Full-text search over request bodies and topic texts, kept current by triggers.

    The indexes are derived tables: writing them never touches audit_log's rows, so the append-only
    guarantees and the hash chain are unaffected (and verify does not read them).
    """
    db.execute(
        "CREATE VIRTUAL TABLE audit_log_fts USING fts5("
        "request_body, detail, content='audit_log', content_rowid='id')"
    )
    db.execute(
        "CREATE TRIGGER audit_log_fts_insert AFTER INSERT ON audit_log BEGIN "
        "INSERT INTO audit_log_fts (rowid, request_body, detail) VALUES (new.id, new.request_body, new.detail); END"
    )
    db.execute("INSERT INTO audit_log_fts (audit_log_fts) VALUES ('rebuild')")
    db.execute(
        "CREATE VIRTUAL TABLE topics_fts USING fts5("
        "name, introduction, notification, content='topics', content_rowid='rowid')"
    )
    db.execute(
        "CREATE TRIGGER topics_fts_insert AFTER INSERT ON topics BEGIN "
        "INSERT INTO topics_fts (rowid, name, introduction, notification) "
        "VALUES (new.rowid, new.name, new.introduction, new.notification); END"
    )
    db.execute(
        "CREATE TRIGGER topics_fts_update AFTER UPDATE ON topics BEGIN "
        "INSERT INTO topics_fts (topics_fts, rowid, name, introduction, notification) "
        "VALUES ('delete', old.rowid, old.name, old.introduction, old.notification); "
        "INSERT INTO topics_fts (rowid, name, introduction, notification) "
        "VALUES (new.rowid, new.name, new.introduction, new.notification); END"
    )
    db.execute(
        "CREATE TRIGGER topics_fts_delete AFTER DELETE ON topics BEGIN "
        "INSERT INTO topics_fts (topics_fts, rowid, name, introduction, notification) "
        "VALUES ('delete', old.rowid, old.name, old.introduction, old.notification); END"
    )
    db.execute("INSERT INTO topics_fts (topics_fts) VALUES ('rebuild')")
    # The latency chart reads received_at and elapsed_ms from one covering index.
    db.execute("DROP INDEX idx_audit_log_received_at")
    db["audit_log"].create_index(["received_at", "elapsed_ms"])  # type: ignore[union-attr]


def migrate(path: Path) -> None:
    """Create or upgrade the database at ``path`` (WAL mode is persistent, so it is set here once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = Database(path)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        migrations.apply(db)
    finally:
        db.close()
