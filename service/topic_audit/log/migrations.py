"""The schema, as named sqlite-utils migrations. The schema lives here and nowhere else.

Rules for new migrations: never ``Table.transform()`` ``audit_log`` (it drops triggers and would rewrite
the chained rows); add columns with ``ALTER TABLE … ADD COLUMN`` and list them in ``chain.COLUMNS``;
``tests/test_migrations.py`` checks the append-only triggers still exist after every migration.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from topic_audit.tencent import models

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


LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2.5, 5, 10, 25, 100, 500, 2000)


@migrations()
def m006_rollups(db: Database) -> None:
    """Hourly counts kept by a trigger, so that charts over months of callbacks read a few rows.

    Derived data like the full-text indexes: audit_log's rows are never touched.
    """
    db.execute(
        "CREATE TABLE callbacks_hourly (hour TEXT NOT NULL, callback_command TEXT NOT NULL, outcome TEXT NOT NULL, "
        "reason TEXT NOT NULL, callbacks INTEGER NOT NULL, PRIMARY KEY (hour, callback_command, outcome, reason))"
    )
    db.execute(
        "CREATE TABLE latency_hourly (hour TEXT NOT NULL, le_ms REAL NOT NULL, callbacks INTEGER NOT NULL, "
        "PRIMARY KEY (hour, le_ms))"
    )
    bucket = "CASE " + " ".join(f"WHEN {{e}} <= {b} THEN {b}" for b in LATENCY_BUCKETS_MS) + " ELSE 1e9 END"
    hour = "substr({r}, 1, 13) || ':00:00Z'"
    db.execute(
        "CREATE TRIGGER audit_log_rollups AFTER INSERT ON audit_log BEGIN "
        "INSERT INTO callbacks_hourly VALUES ("
        f"{hour.format(r='new.received_at')}, coalesce(new.callback_command, ''), new.outcome, "
        "coalesce(new.reason, 'none'), 1) ON CONFLICT DO UPDATE SET callbacks = callbacks + 1; "
        f"INSERT INTO latency_hourly VALUES ({hour.format(r='new.received_at')}, "
        f"{bucket.format(e='new.elapsed_ms')}, 1) ON CONFLICT DO UPDATE SET callbacks = callbacks + 1; END"
    )
    db.execute(
        f"INSERT INTO callbacks_hourly SELECT {hour.format(r='received_at')}, coalesce(callback_command, ''), "
        "outcome, coalesce(reason, 'none'), count(*) FROM audit_log GROUP BY 1, 2, 3, 4"
    )
    db.execute(
        f"INSERT INTO latency_hourly SELECT {hour.format(r='received_at')}, {bucket.format(e='elapsed_ms')}, "
        "count(*) FROM audit_log GROUP BY 1, 2"
    )
    db["topics"].create_index(["created_at", "group_id"])  # type: ignore[union-attr]
    db["topics"].create_index(["updated_at"])  # type: ignore[union-attr]
    # Multi-topic destroys (topic_id NULL) are found by command without a scan.
    db.execute("DROP INDEX idx_audit_log_callback_command")
    db["audit_log"].create_index(["callback_command", "topic_id"])  # type: ignore[union-attr]


@migrations()
def m007_search_behind_the_writer(db: Database) -> None:
    # The writer indexes request bodies in batches (topic_audit.log.search), off the commit path.
    db.execute("DROP TRIGGER audit_log_fts_insert")


@migrations()
def m008_rollups_by_the_writer(db: Database) -> None:
    # The writer adds each group's counts in one statement per hour and outcome (topic_audit.log.rollups)
    # instead of two trigger statements per row.
    db.execute("DROP TRIGGER audit_log_rollups")


@migrations()
def m009_topic_counts(db: Database) -> None:
    """Topics per state, kept by the writer with each group: every receiver process can report the
    exact totals without counting the table (derived data, like the rollups)."""
    db.execute(
        "CREATE TABLE topic_counts (state TEXT PRIMARY KEY CHECK (state IN ('active', 'deleted')), "
        "topics INTEGER NOT NULL)"
    )
    db.execute(
        "INSERT INTO topic_counts SELECT 'active', count(*) FROM topics WHERE deleted_entry_id IS NULL "
        "UNION ALL SELECT 'deleted', count(*) FROM topics WHERE deleted_entry_id IS NOT NULL"
    )


@migrations()
def m010_client_cert_subject(db: Database) -> None:
    """The subject of the verified TLS client certificate (Tencent's, with mutual authentication).
    In the canonical form only when not NULL (``chain.LATER``): older entries keep their hashes."""
    db.execute("ALTER TABLE audit_log ADD COLUMN client_cert_subject TEXT")


@migrations()
def m011_forwarding(db: Database) -> None:
    """Forwarding to the app's own handler: ``deliveries`` (append-only and chained like ``audit_log``,
    one row per attempt) and ``outbox`` (current state per request and destination)."""
    db.execute(
        """
        CREATE TABLE deliveries (
            id INTEGER PRIMARY KEY,
            audit_id INTEGER NOT NULL REFERENCES audit_log(id),
            destination TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('before', 'after')),
            attempt INTEGER NOT NULL,
            started_at TEXT NOT NULL,
            status_code INTEGER,
            error TEXT CHECK (error IN ('http_error', 'timeout', 'connection_error')),
            detail TEXT,
            response_body TEXT,
            elapsed_ms REAL NOT NULL,
            replay INTEGER NOT NULL CHECK (replay IN (0, 1)),
            prev_hash TEXT NOT NULL,
            entry_hash TEXT NOT NULL
        )
        """
    )
    for action in ("UPDATE", "DELETE"):
        db.execute(
            f"CREATE TRIGGER deliveries_no_{action.lower()} BEFORE {action} ON deliveries "
            f"BEGIN SELECT RAISE(ABORT, 'deliveries is append-only: {action} refused'); END"
        )
    db.execute(
        "CREATE TRIGGER deliveries_append_only BEFORE INSERT ON deliveries "
        "WHEN NEW.id IS NOT (SELECT coalesce(max(id), 0) FROM deliveries) + 1 "
        "BEGIN SELECT RAISE(ABORT, 'deliveries is append-only: ids must continue the log'); END"
    )
    db["deliveries"].create_index(["audit_id"])  # type: ignore[union-attr]
    db["deliveries"].create_index(["destination", "started_at"])  # type: ignore[union-attr]
    db.execute(
        """
        CREATE TABLE outbox (
            audit_id INTEGER NOT NULL REFERENCES audit_log(id),
            destination TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            step INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TEXT,
            last_error TEXT,
            replay INTEGER NOT NULL DEFAULT 0,
            queued_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (audit_id, destination)
        ) WITHOUT ROWID
        """
    )
    db["outbox"].create_index(["state", "destination", "next_attempt_at"])  # type: ignore[union-attr]
    # Checkpoints sign the head of the deliveries chain too.
    db.execute("ALTER TABLE checkpoints ADD COLUMN deliveries_size INTEGER")
    db.execute("ALTER TABLE checkpoints ADD COLUMN deliveries_head TEXT")


@migrations()
def m012_lighter_commits(db: Database) -> None:
    """Less work in each group's transaction (issue: the callback path at half the bare framework's cost).

    - ``topics_fts`` is filled behind the writer (``topic_audit.log.search``) instead of by three triggers
      that ran two FTS5 statements per changed topic inside the commit. It now keeps its own copy of the
      indexed texts, so that a topic's old terms can be removed by rowid when it is indexed again;
      ``search_progress`` remembers the last log entry whose topic is indexed.
    - Multi-topic destroys (``topic_id`` NULL) are found by a partial index that only those rows enter,
      instead of an index on (callback_command, topic_id) that every row entered at a random place. It
      keeps both columns so that the planner prefers it to ``idx_audit_log_topic_id`` (``topic_id IS
      NULL``, a fifth of a realistic log) for ``topic_history``; ``tests/test_explore.py`` checks the plan.
    """
    for action in ("insert", "update", "delete"):
        db.execute(f"DROP TRIGGER topics_fts_{action}")
    db.execute("DROP TABLE topics_fts")
    db.execute("CREATE VIRTUAL TABLE topics_fts USING fts5(name, introduction, notification)")
    db.execute(
        "CREATE TABLE search_progress (name TEXT PRIMARY KEY, last_entry_id INTEGER NOT NULL) WITHOUT ROWID"
    )
    db.execute(
        "INSERT INTO topics_fts (rowid, name, introduction, notification) "
        "SELECT rowid, name, introduction, notification FROM topics"
    )
    db.execute("INSERT INTO search_progress SELECT 'topics_fts', coalesce(max(id), 0) FROM audit_log")
    db.execute("DROP INDEX idx_audit_log_callback_command_topic_id")
    db.execute(
        "CREATE INDEX idx_audit_log_multi_topic_destroys ON audit_log (callback_command, topic_id) "
        f"WHERE callback_command = '{models.AFTER_DESTROYED}' AND topic_id IS NULL"
    )


@migrations()
def m013_transparency_log(db: Database) -> None:
    """The RFC 9162 tree over the log as C2SP tlog-tiles hashes (``topic_audit.transparency.tree``; filled by the
    checkpoint job, so nothing here scans the log), and each checkpoint's signed note."""
    db.execute(
        "CREATE TABLE tree_hashes (level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL, "
        "PRIMARY KEY (level, idx)) WITHOUT ROWID"
    )
    db.execute("ALTER TABLE checkpoints ADD COLUMN note TEXT")


@migrations()
def m014_forgetting(db: Database) -> None:
    """Retention and erasure (docs/privacy.md; the record's form in docs/log-format.md, "Erasure records"): keyed commitments and erasure records.

    - ``audit_log.content_commitment`` (in ``chain.LATER``): new entries' hash covers it instead of their
      content; ``content_keys`` holds each entry's salt until its content is erased.
    - ``erasures``: append-only and chained like ``deliveries``, one row per erasure; its head is signed in
      every checkpoint. ``erased_entries``: which record erased each entry, and the evidence the
      projection needs to replay it (``topic_audit.privacy.erasure``).
    - The append-only triggers of ``audit_log``, ``deliveries`` and ``content_keys`` allow exactly one
      change: an erasure, i.e. content columns set to their erased values, evidence untouched, for an
      entry listed in ``erased_entries``.
    """
    from topic_audit.log import content  # the one list of content columns

    db.execute("ALTER TABLE audit_log ADD COLUMN content_commitment TEXT")
    db.execute(
        "CREATE TABLE content_keys (entry_id INTEGER PRIMARY KEY REFERENCES audit_log(id), salt BLOB NOT NULL)"
    )
    db.execute(
        """
        CREATE TABLE erasures (
            id INTEGER PRIMARY KEY,
            erased_at TEXT NOT NULL,
            cause TEXT NOT NULL CHECK (cause IN ('request', 'retention', 'policy')),
            reason TEXT NOT NULL,
            selector_digest TEXT,
            first_id INTEGER NOT NULL,
            last_id INTEGER NOT NULL,
            entries INTEGER NOT NULL,
            entries_digest TEXT NOT NULL,
            evidence_digest TEXT NOT NULL,
            deliveries_upto INTEGER NOT NULL,
            prev_hash TEXT NOT NULL,
            entry_hash TEXT NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE erased_entries (
            entry_id INTEGER PRIMARY KEY REFERENCES audit_log(id),
            erasure_id INTEGER NOT NULL REFERENCES erasures(id),
            effects TEXT
        )
        """
    )
    db["erased_entries"].create_index(["erasure_id"])  # type: ignore[union-attr]
    for table in ("erasures", "erased_entries"):
        for action in ("UPDATE", "DELETE"):
            db.execute(
                f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {action} refused'); END"
            )
    db.execute(
        "CREATE TRIGGER erasures_append_only BEFORE INSERT ON erasures "
        "WHEN NEW.id IS NOT (SELECT coalesce(max(id), 0) FROM erasures) + 1 "
        "BEGIN SELECT RAISE(ABORT, 'erasures is append-only: ids must continue the log'); END"
    )
    listed = "EXISTS (SELECT 1 FROM erased_entries WHERE entry_id = {})"
    evidence = " AND ".join(
        f"NEW.{c} IS OLD.{c}" for c in _columns(db, "audit_log") if c not in content.CONTENT
    )
    blanked = " AND ".join(f"NEW.{c} IS {_sql(content.ERASED[c])}" for c in content.CONTENT)
    db.execute("DROP TRIGGER audit_log_no_update")
    db.execute(
        "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
        f"WHEN NOT ({evidence} AND {blanked} AND {listed.format('NEW.id')}) "
        "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE refused (only a recorded erasure may "
        "blank content)'); END"
    )
    kept = " AND ".join(
        f"NEW.{c} IS OLD.{c}" for c in _columns(db, "deliveries") if c not in ("response_body", "detail")
    )
    db.execute("DROP TRIGGER deliveries_no_update")
    db.execute(
        "CREATE TRIGGER deliveries_no_update BEFORE UPDATE ON deliveries "
        f"WHEN NOT ({kept} AND NEW.response_body IS NULL AND NEW.detail IS NULL "
        f"AND {listed.format('NEW.audit_id')}) "
        "BEGIN SELECT RAISE(ABORT, 'deliveries is append-only: UPDATE refused'); END"
    )
    db.execute(
        "CREATE TRIGGER content_keys_no_update BEFORE UPDATE ON content_keys "
        "BEGIN SELECT RAISE(ABORT, 'content_keys: UPDATE refused'); END"
    )
    db.execute(
        "CREATE TRIGGER content_keys_no_delete BEFORE DELETE ON content_keys "
        f"WHEN NOT {listed.format('OLD.entry_id')} "
        "BEGIN SELECT RAISE(ABORT, 'content_keys: only an erasure deletes a salt'); END"
    )
    db.execute("ALTER TABLE checkpoints ADD COLUMN erasures_size INTEGER")
    db.execute("ALTER TABLE checkpoints ADD COLUMN erasures_head TEXT")


def _columns(db: Database, table: str) -> list[str]:
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})").fetchall()]


def _sql(value: str | None) -> str:
    return "NULL" if value is None else f"'{value}'"


@migrations()
def m015_entry_page_indexes(db: Database) -> None:
    """What Datasette's page of one entry counts (rows of other tables pointing at it), in indexes: only
    duplicates enter the first, only deleted topics the last; a topic's created and updated ids are
    written with the topic (measured in ``make bench-queries``)."""
    db.execute(
        "CREATE INDEX idx_audit_log_duplicate_of ON audit_log (duplicate_of) WHERE duplicate_of IS NOT NULL"
    )
    db["topics"].create_index(["created_entry_id"])  # type: ignore[union-attr]
    db["topics"].create_index(["updated_entry_id"])  # type: ignore[union-attr]
    db.execute(
        "CREATE INDEX idx_topics_deleted_entry_id ON topics (deleted_entry_id) WHERE deleted_entry_id IS NOT NULL"
    )


@migrations()
def m016_effects_digest(db: Database) -> None:
    """``erasures.effects_digest``: each record commits to what the projection replays in place of the
    topic events it erased (``erased_entries.effects``), so that editing it is a finding. Records written
    before keep their hash (the column is hashed only when not NULL) and their effects stay unchecked."""
    db.execute("ALTER TABLE erasures ADD COLUMN effects_digest TEXT")


@migrations()
def m017_signed_boundaries(db: Database) -> None:
    """What a forged erasure could hide behind, fixed and signed (``topic_audit.writer.signer``):

    - ``log_facts``: facts about the log that never change once written (append-only):
      ``commitments_from``, the first entry id that must carry a ``content_commitment`` (every entry
      from there is hashed over its evidence and commitment, erased or not); ``signed_erasures_from``,
      the first ``erasures`` record that must carry a signature. Both are signed in every checkpoint.
    - ``erasures.signature``: the Ed25519 signature of the record's hash under the checkpoint signing
      key (``topic_audit.privacy.records.sign``): the database alone cannot mint a record.
    """
    db.execute("CREATE TABLE log_facts (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID")
    for action in ("UPDATE", "DELETE"):
        db.execute(
            f"CREATE TRIGGER log_facts_no_{action.lower()} BEFORE {action} ON log_facts "
            f"BEGIN SELECT RAISE(ABORT, 'log_facts is append-only: {action} refused'); END"
        )
    # Every entry since m014 carries a commitment: the first one that does starts the rule.
    first = db.execute(
        "SELECT coalesce((SELECT min(id) FROM audit_log WHERE content_commitment IS NOT NULL), "
        "(SELECT coalesce(max(id), 0) + 1 FROM audit_log))"
    ).fetchone()[0]
    records = db.execute("SELECT coalesce(max(id), 0) + 1 FROM erasures").fetchone()[0]
    db.execute(
        "INSERT INTO log_facts (name, value) VALUES ('commitments_from', ?), ('signed_erasures_from', ?)",
        [first, records],
    )
    db.execute("ALTER TABLE erasures ADD COLUMN signature TEXT")
    db.execute("ALTER TABLE checkpoints ADD COLUMN commitments_from INTEGER")
    db.execute("ALTER TABLE checkpoints ADD COLUMN signed_erasures_from INTEGER")


@migrations()
def m018_cluster_intake(db: Database) -> None:
    """Cluster mode (docs/cluster.md): ``cluster_intake`` holds every message of the JetStream intake streams
    the writer has applied, by its stream and sequence, committed in the same transaction as the entry
    it became -- ``entry_id`` NULL for a second copy of a message applied already (a receiver's publish
    retried on the other intake stream: one callback, one entry). ``id`` is the order of application.
    The writer resumes each stream after its highest ``seq``, so that each message is applied exactly once
    across restarts and failovers. ``msg_id`` is the receiver's random message id (no content).
    Append-only."""
    db.execute(
        "CREATE TABLE cluster_intake (id INTEGER PRIMARY KEY, stream TEXT NOT NULL, seq INTEGER NOT NULL, "
        "msg_id TEXT NOT NULL, entry_id INTEGER REFERENCES audit_log(id), UNIQUE (stream, seq))"
    )
    db.execute("CREATE INDEX cluster_intake_msg_id ON cluster_intake (msg_id)")
    db.execute(
        "CREATE INDEX cluster_intake_entry_id ON cluster_intake (entry_id)"
    )  # erasure reaching the intake
    for action in ("UPDATE", "DELETE"):
        db.execute(
            f"CREATE TRIGGER cluster_intake_no_{action.lower()} BEFORE {action} ON cluster_intake "
            f"BEGIN SELECT RAISE(ABORT, 'cluster_intake is append-only: {action} refused'); END"
        )


def pending(path: Path) -> bool:
    """Whether :func:`migrate` has anything to do at ``path``: a new database, or migrations not applied
    yet (an upgrade, whose migrations may scan the whole log). A read of the migrations table; nothing is
    written."""
    if not path.exists():
        return True
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return bool(migrations.pending(Database(conn)))
    finally:
        conn.close()


def migrate(path: Path) -> None:
    """Create or upgrade the database at ``path`` (WAL mode is persistent, so it is set here once).

    Every command that writes the database migrates it first, so this is where it is made private
    (:func:`topic_audit.log.database.private`): folder 0700, files 0600, this process's umask 077.
    """
    from topic_audit.log.database import private

    private(path)
    db = Database(path)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        migrations.apply(db)
    finally:
        db.close()
