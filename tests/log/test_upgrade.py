"""Every migration upgrades a populated log in place.

For every migration, a log as the schema before it held it is upgraded in place; then `verify` finds
nothing, the projection and the rollups equal a rebuild from the log, and the receiver carries on with
it. The log before migration N is made from a reference log written today by the real receiver
(topics created, changed and destroyed, redeliveries, rejections, before-callbacks, forwarded deliveries,
signed checkpoints): the schema up to N-1 is created, and each of its tables is filled the way the code
of that schema filled it --
- a table that a trigger of that schema fills (the rollups before m008, the full-text indexes before
  m007 and m012) is left to its trigger, which fires as the rows it follows are copied;
- a full-text index without a trigger is filled the way the writer's indexer did (behind the log: the
  last few entries not yet indexed);
- every other table gets the reference's rows, in the columns that schema has. A column that today's
  rows fill but that schema lacks fails the test (such rows could not have been written then: a BEFORE
  function must say how they looked), and so does a table that today's schema no longer has;
- then the functions of BEFORE run (see below);
- last, the checkpoints are signed again with the reference's key, over the columns that schema's
  table has (the statement is its fields that are not NULL: five before m011, seven since), each head
  read from the rows as they now stand.
A new migration is tested by construction. When what the code of a schema wrote differs from today's
rows in a way these rules do not give (a change to what an entry's hash covers, say), add a function to
BEFORE, keyed by the first migration whose code writes today's form: it is run on the copy of every log
older than that migration, and rewrites its rows (chains included) the way the code of that time wrote
them.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import tlog_reference
from click.testing import CliRunner
from conftest import APP_ID, TOKEN, Server, random_history, run_cli, wait_for
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from destination import Destination
from litestar.testing import TestClient
from sqlite_utils import Database
from topic_audit.cli import main as cli_main
from topic_audit.log import chain
from topic_audit.log.migrations import LATENCY_BUCKETS_MS, migrate, migrations
from topic_audit.metrics import Metrics
from topic_audit.receiver.app import create_app
from topic_audit.settings import Settings
from topic_audit.tencent import samples
from topic_audit.transparency import note


def _rechain(conn: sqlite3.Connection, table: str, hashed: Callable[[dict[str, Any]], str]) -> None:
    """Rewrite the chain of ``table`` as older code wrote it: each row's ``entry_hash`` is ``hashed(row)``
    (its ``prev_hash`` already the row before's), past the table's append-only trigger."""
    conn.row_factory = sqlite3.Row
    written = [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY id")]
    conn.row_factory = None
    prev = chain.GENESIS
    for row in written:
        row["prev_hash"] = prev
        row["entry_hash"] = prev = hashed(row)
    (trigger,) = conn.execute(
        "SELECT sql FROM sqlite_master WHERE name = ?", (f"{table}_no_update",)
    ).fetchone()
    conn.execute(f"DROP TRIGGER {table}_no_update")  # the rows as that code wrote them, not an update
    conn.executemany(
        f"UPDATE {table} SET prev_hash = ?, entry_hash = ? WHERE id = ?",
        [(r["prev_hash"], r["entry_hash"], r["id"]) for r in written],
    )
    conn.execute(trigger)


def _hashed_with_the_content(conn: sqlite3.Connection) -> None:
    """Before m014 an entry had no keyed commitment: its hash covered its content (chain recomputed)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'audit_log_no_update'").fetchone() is None:
        return  # the log before the first release is empty
    _rechain(conn, "audit_log", lambda row: chain.entry_hash({**row, "content_commitment": None}))
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'tree_hashes'").fetchone() is not None:
        conn.execute("DELETE FROM tree_hashes")  # the tree of those hashes: stored again by the checkpoints


def _records_without_effects(conn: sqlite3.Connection) -> None:
    """Before m016 an erasure record did not commit to its entries' effects (its chain recomputed)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'erasures'").fetchone() is None:
        return

    def hashed(record: dict[str, Any]) -> str:  # that code's canonical form: every column but the hash
        assert "effects_digest" not in record
        shown = {c: v for c, v in record.items() if c != "entry_hash"}
        return hashlib.sha256(json.dumps(shown, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    _rechain(conn, "erasures", hashed)


def _unsigned(conn: sqlite3.Connection) -> None:
    """Before m017 an erasure record carried no signature and a checkpoint signed no boundaries: the
    columns do not exist then, so there is nothing to rewrite (what the copy drops is that)."""


BEFORE: dict[str, Callable[[sqlite3.Connection], None]] = {
    "m014_forgetting": _hashed_with_the_content,
    "m016_effects_digest": _records_without_effects,
    "m017_signed_boundaries": _unsigned,
}
"""How a log written before a migration differs from today's rows (see above)."""
REWRITTEN: dict[str, str] = {
    "audit_log.content_commitment": "m014_forgetting",
    "erasures.effects_digest": "m016_effects_digest",
    "erasures.signature": "m017_signed_boundaries",
    "checkpoints.commitments_from": "m017_signed_boundaries",
    "checkpoints.signed_erasures_from": "m017_signed_boundaries",
}
"""Columns today's rows fill that a BEFORE function accounts for (the migration that added them)."""

NAMES = [m.name for m in migrations._migrations]
FIRST_RELEASE = ("m001_audit_log", "m002_topics")
"""Migrations that only ever ran together, on an empty file: the log before any of them is empty."""

REFERENCE_CALLBACKS = 100


def _signed_post(
    url: str, body: Any, command: str | None = None, app_id: str = APP_ID, token: str = TOKEN
) -> httpx.Response:
    if isinstance(body, dict):
        command = command or body["CallbackCommand"]
        body = json.dumps(body, ensure_ascii=False).encode()
    query = samples.query(app_id, command or "", token)
    return httpx.post(f"{url}/callback?{query}", content=body, timeout=10)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log written today by the real receiver, forwarding to a real destination, with checkpoints."""
    folder = tmp_path_factory.mktemp("reference")
    destination = Destination("ok")
    env = {"TOPIC_AUDIT_FORWARD_URL": destination.url, "TOPIC_AUDIT_CHECKPOINT_SECONDS": "1"}
    server = Server(folder / "audit.db", folder / "server.log", env).start()
    try:
        random_history(lambda body: _signed_post(server.url, body), random.Random(22), REFERENCE_CALLBACKS)
        created = samples.sample("after-create", TopicId="@TGS#_reference")
        assert _signed_post(server.url, created).status_code == 200
        assert _signed_post(server.url, created).status_code == 200  # a redelivery: duplicate
        assert _signed_post(server.url, created, token="wrong-token").status_code == 401
        assert _signed_post(server.url, created, app_id="1400000999").status_code == 403
        assert _signed_post(server.url, b"{", "Group.CallbackAfterCreateTopic").status_code == 400
        assert (
            _signed_post(server.url, {"CallbackCommand": "Group.CallbackAfterCreateTopic"}).status_code == 400
        )
        wait_for(
            lambda: _scalar(folder / "audit.db", "SELECT count(*) FROM outbox WHERE state = 'pending'") == 0,
            60,
            "every forwarded callback delivered",
        )
    finally:
        server.stop()  # signs a last checkpoint over everything
        destination.stop()
    db = folder / "audit.db"
    assert run_cli("verify", "--db", str(db)).returncode == 0
    outcomes = set(json.loads(_scalar(db, "SELECT json_group_array(DISTINCT outcome) FROM audit_log")))
    assert {"accepted", "duplicate", "ignored", "rejected"} <= outcomes, outcomes
    for table in ("deliveries", "checkpoints", "topics WHERE deleted_entry_id IS NOT NULL"):
        assert _scalar(db, f"SELECT count(*) FROM {table}") > 0, f"the reference log has no rows in {table}"
    return db


def _scalar(db: Path, sql: str) -> Any:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def _columns(conn: sqlite3.Connection, table: str, schema: str = "main") -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA {schema}.table_info({table})")]


def _schema(conn: sqlite3.Connection) -> tuple[list[str], set[str], str]:
    """(ordinary tables in creation order, full-text tables, the SQL of every trigger)."""
    found = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "AND name != '_sqlite_migrations' ORDER BY rowid"
    ).fetchall()
    virtual = {name for name, sql in found if sql.upper().startswith("CREATE VIRTUAL TABLE")}
    shadow = {f"{v}_{s}" for v in virtual for s in ("data", "idx", "content", "docsize", "config")}
    tables = [name for name, _ in found if name not in virtual and name not in shadow]
    triggers = " ".join(r[0] for r in conn.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger'"))
    return tables, virtual, triggers


def _filled_by_a_trigger(table: str, triggers: str) -> bool:
    return f"INSERT INTO {table} " in triggers or f"INSERT INTO {table}(" in triggers


def _copy(conn: sqlite3.Connection, table: str, before: str) -> None:
    """The reference's rows of ``table`` in the columns the older schema has."""
    mine = _columns(conn, table)
    theirs = _columns(conn, table, "reference")
    assert theirs, f"{table} exists before {before} but no longer: add to BEFORE in {__name__} what was in it"
    for column in set(theirs) - set(mine):
        if f"{table}.{column}" in REWRITTEN:
            continue
        filled = conn.execute(f"SELECT count(*) FROM reference.{table} WHERE {column} IS NOT NULL").fetchone()
        assert filled[0] == 0, (
            f"{table}.{column} is filled in today's rows but does not exist before {before}: add to BEFORE in "
            f"{__name__} how the rows of that time looked"
        )
    keep = [c for c in mine if c in theirs]
    # Rowids are kept (the full-text index of topics is keyed by them); a WITHOUT ROWID table has none,
    # and an INTEGER PRIMARY KEY is the rowid already.
    plain_rowid = conn.execute(
        "SELECT sql NOT LIKE '%WITHOUT ROWID%' FROM sqlite_master WHERE name = ?", (table,)
    ).fetchone()[0] and not any(
        r[5] and r[2].upper() == "INTEGER" for r in conn.execute(f"PRAGMA table_info({table})")
    )
    names = ", ".join(["rowid", *keep] if plain_rowid else keep)
    guards = conn.execute(  # an append-only table's own triggers refuse the DELETE below
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ? AND sql LIKE '%append-only%'",
        (table,),
    ).fetchall()
    for trigger, _ in guards:
        conn.execute(f"DROP TRIGGER {trigger}")
    conn.execute(f"DELETE FROM {table}")  # what its migration seeded, the code of the time kept up to date
    conn.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM reference.{table} ORDER BY 1")
    for _, sql in guards:
        conn.execute(sql)


def _sign_checkpoints(conn: sqlite3.Connection, reference: Path) -> list[dict[str, Any]]:
    """The reference's checkpoints signed again, as the code of this schema signed them: over the fields its
    table has, those not NULL (the statement form of ``topic_audit.transparency.checkpoints``), each head read from the
    rows as they now stand (``head_hash`` from ``audit_log``, ``X_head`` from table X at ``X_size``)."""
    columns = [c for c in _columns(conn, "checkpoints") if c not in ("id", "digest", "signature")]
    key = serialization.load_pem_private_key(Settings(db=reference).signing_key_path.read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    public_key = (
        key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    )
    conn.row_factory = sqlite3.Row
    try:
        originals = [dict(r) for r in conn.execute("SELECT * FROM reference.checkpoints ORDER BY id")]
    finally:
        conn.row_factory = None

    def head(table: str, size: int) -> str:
        found = conn.execute(f"SELECT entry_hash FROM main.{table} WHERE id = ?", (size,)).fetchone()
        assert found is not None or size == 0, f"a checkpoint covers {size} rows of {table}, which has fewer"
        return str(found[0]) if found is not None else chain.GENESIS

    signed: list[dict[str, Any]] = []
    for original in originals:
        statement = {c: original[c] for c in columns if original.get(c) is not None}
        statement["head_hash"] = head("audit_log", statement["log_size"])
        for column in [c for c in statement if c.endswith("_head") and f"{c[:-5]}_size" in statement]:
            statement[column] = head(column[:-5], statement[f"{column[:-5]}_size"])
        if "note" in statement:  # the tree of the entries as they now stand, under the note's origin
            size, origin = statement["log_size"], statement["note"].split("\n", 1)[0]
            hashes = [
                bytes.fromhex(h)
                for (h,) in conn.execute("SELECT entry_hash FROM main.audit_log ORDER BY id LIMIT ?", (size,))
            ]
            text = note.Checkpoint(origin, size, tlog_reference.root_from_leaves(hashes)).text()
            statement["note"] = note.sign(text, origin, key)
        statement["prev_digest"] = signed[-1]["digest"] if signed else chain.GENESIS
        statement["public_key"] = public_key
        raw = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
        line = {**statement, "digest": hashlib.sha256(raw).hexdigest(), "signature": key.sign(raw).hex()}
        conn.execute(
            f"INSERT INTO checkpoints ({', '.join(line)}) VALUES ({', '.join('?' * len(line))})",
            list(line.values()),
        )
        signed.append(line)
    return signed


def _index_behind(conn: sqlite3.Connection, table: str) -> None:
    """A full-text index that the writer's indexer fills, as it stood: up to a few entries ago."""
    if table == "audit_log_fts":
        conn.execute(
            "INSERT INTO audit_log_fts (rowid, request_body, detail) SELECT id, request_body, detail "
            "FROM audit_log WHERE id <= (SELECT max(id) - 3 FROM audit_log) ORDER BY id"
        )
    elif table == "topics_fts":  # its own copy of the texts, and search_progress saying how far
        conn.execute(
            "INSERT INTO topics_fts (rowid, name, introduction, notification) "
            "SELECT rowid, name, introduction, notification FROM topics"
        )
        conn.execute("UPDATE search_progress SET last_entry_id = (SELECT max(id) FROM audit_log)")
    else:
        raise AssertionError(f"no rule for the full-text table {table}: add it to _index_behind")


def written_before(name: str, reference: Path, folder: Path) -> tuple[Path, list[str]]:
    """The reference log as the schema before migration ``name`` held it (see above), and its tables."""
    db_path = folder / "audit.db"
    db = Database(db_path)
    migrations.apply(db, stop_before=FIRST_RELEASE[0] if name in FIRST_RELEASE else name)
    db.close()
    shutil.copy(Settings(db=reference).signing_key_path, folder / "checkpoint-signing.key")  # the old default
    conn = sqlite3.connect(db_path)
    conn.execute("ATTACH DATABASE ? AS reference", (str(reference),))  # read only
    tables, virtual, triggers = _schema(conn)
    for table in sorted(tables, key=lambda t: t not in ("audit_log", "topics")):
        if table != "checkpoints" and not _filled_by_a_trigger(table, triggers):
            _copy(conn, table, name)
    for later in NAMES[NAMES.index(name) :]:
        if later in BEFORE:
            BEFORE[later](conn)
    if "checkpoints" in tables:  # signed over the rows as they are now
        lines = _sign_checkpoints(conn, reference)
        with (folder / "audit.db.checkpoints.jsonl").open("w") as f:
            f.writelines(json.dumps(line, sort_keys=True) + "\n" for line in lines)
    for table in sorted(virtual):
        if not _filled_by_a_trigger(table, triggers):
            _index_behind(conn, table)
    conn.commit()
    conn.execute("DETACH DATABASE reference")
    conn.close()
    return db_path, tables


def _table(conn: sqlite3.Connection, sql: str) -> list[tuple[Any, ...]]:
    return sorted(conn.execute(sql).fetchall(), key=repr)


HOURLY = (
    "SELECT substr(received_at, 1, 13) || ':00:00Z', coalesce(callback_command, ''), outcome, "
    "coalesce(reason, 'none'), count(*) FROM audit_log GROUP BY 1, 2, 3, 4"
)
BUCKET = "CASE " + " ".join(f"WHEN elapsed_ms <= {b} THEN {b}" for b in LATENCY_BUCKETS_MS) + " ELSE 1e9 END"
LATENCY = f"SELECT substr(received_at, 1, 13) || ':00:00Z', {BUCKET}, count(*) FROM audit_log GROUP BY 1, 2"


def assert_derived_tables_equal_a_rebuild(db: Path, tmp_path: Path) -> None:
    rebuilt = tmp_path / "rebuilt.db"
    shutil.copy(db, rebuilt)
    result = CliRunner().invoke(cli_main, ["rebuild-projection", "--db", str(rebuilt)])
    assert result.exit_code == 0, result.output
    assert " 0 differed from the log" in result.output, result.output
    conn = sqlite3.connect(db)
    conn.execute("ATTACH DATABASE ? AS rebuilt", (str(rebuilt),))
    try:
        for table in ("topics", "topic_counts"):
            assert _table(conn, f"SELECT * FROM {table}") == _table(conn, f"SELECT * FROM rebuilt.{table}"), (
                table
            )
        assert _table(conn, "SELECT * FROM callbacks_hourly") == _table(conn, HOURLY)
        assert _table(conn, "SELECT * FROM latency_hourly") == _table(conn, LATENCY)
        assert _table(conn, "SELECT state, topics FROM topic_counts WHERE topics > 0") == _table(
            conn,
            "SELECT iif(deleted_entry_id IS NULL, 'active', 'deleted'), count(*) FROM topics GROUP BY 1",
        )
    finally:
        conn.close()


def assert_verified(db: Path, entries: int) -> None:
    result = CliRunner().invoke(cli_main, ["verify", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["findings"] == [] and report["entries"] == entries, report


def _dump(db: Path, table: str, columns: list[str] | None = None) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT {', '.join(columns or ['*'])} FROM {table} ORDER BY 1, 2").fetchall()
    finally:
        conn.close()


AFTER_THE_UPGRADE = (
    samples.sample("after-create", TopicId="@TGS#_after_upgrade"),
    samples.sample("info-changed", TopicId=f"{samples.DOC_TOPIC}-1", Name="renamed after the upgrade"),
    samples.sample("destroyed", TopicIdList=[f"{samples.DOC_TOPIC}-2", "@TGS#_after_upgrade"]),
)


def _indexed(db: Path, entries: int) -> bool:
    """Both full-text indexes hold everything: every entry, and every topic with a text as it is now (a
    topic only ever seen in a multi-topic destroy has none, and no index row)."""
    conn = sqlite3.connect(db)
    try:
        texts = "SELECT rowid, name, introduction, notification FROM {} WHERE coalesce(name, introduction, notification) IS NOT NULL"
        return conn.execute("SELECT count(*) FROM audit_log_fts_docsize").fetchone()[0] == entries and _table(
            conn, texts.format("topics_fts")
        ) == _table(conn, texts.format("topics"))
    finally:
        conn.close()


@pytest.mark.parametrize("name", NAMES)
def test_a_populated_log_is_upgraded_in_place(name: str, reference: Path, tmp_path: Path) -> None:
    db, tables = written_before(name, reference, tmp_path)
    entries = _scalar(db, "SELECT count(*) FROM audit_log") if "audit_log" in tables else 0
    assert entries == (0 if name in FIRST_RELEASE else _scalar(reference, "SELECT count(*) FROM audit_log"))
    migrate(db)  # in place, as `serve` and `topic-audit migrate` do
    assert [m.name for m in migrations.applied(Database(db))] == NAMES
    assert_verified(db, entries)
    assert_derived_tables_equal_a_rebuild(db, tmp_path)
    rewritten = [later for later in NAMES[NAMES.index(name) :] if later in BEFORE]
    for table in ("audit_log", "topics", "deliveries", "outbox"):
        if table not in tables:
            continue
        if table == "audit_log" and rewritten:  # a BEFORE function rewrote how its rows were hashed
            kept = [c for c in chain.COLUMNS if c not in ("prev_hash", "entry_hash", "content_commitment")]
            assert _dump(db, table, kept) == _dump(reference, table, kept), table
        else:  # kept exactly, hashed columns included
            assert _dump(db, table) == _dump(reference, table), table
    # The receiver carries on with the upgraded log: its writer, its indexer and its checkpoints.
    with TestClient(create_app(Settings(sdk_app_id=APP_ID, token=TOKEN, db=db), Metrics())) as client:
        for body in AFTER_THE_UPGRADE:
            query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
            assert client.post(f"/callback?{query}", json=body).json()["ErrorCode"] == 0
        wait_for(lambda: _indexed(db, entries + 3), 20, "the search indexes to catch up")
    assert_verified(db, entries + 3)
    assert_derived_tables_equal_a_rebuild(db, tmp_path)


def test_erasure_records_written_before_effects_digest_still_verify(reference: Path, tmp_path: Path) -> None:
    """A log with erasure records from before m016 (no ``effects_digest``) upgrades and verifies; records
    written after the upgrade commit to their effects."""
    erased = tmp_path / "erased" / "audit.db"
    erased.parent.mkdir()
    source = sqlite3.connect(reference)
    target = sqlite3.connect(erased)
    source.backup(target)
    source.close()
    target.close()
    shutil.copy(Settings(db=reference).signing_key_path, erased.parent / "checkpoint-signing.key")
    topic = _scalar(reference, "SELECT topic_id FROM topics WHERE deleted_entry_id IS NULL LIMIT 1")
    for selector in (["--topic", topic], ["--from-id", "3", "--to-id", "9"]):
        done = run_cli("erase", "--db", str(erased), *selector, "--reason", "before m016", "--yes")
        assert done.returncode == 0, done.stderr
    assert _scalar(erased, "SELECT count(*) FROM erasures WHERE effects_digest IS NOT NULL") == 2
    (tmp_path / "before").mkdir()
    db, _ = written_before("m016_effects_digest", erased, tmp_path / "before")
    entries = _scalar(db, "SELECT count(*) FROM audit_log")
    migrate(db)
    assert _scalar(db, "SELECT count(*) FROM erasures WHERE effects_digest IS NULL") == 2
    assert_verified(db, entries)
    assert_derived_tables_equal_a_rebuild(db, tmp_path)
    done = run_cli("erase", "--db", str(db), "--id", "12", "--reason", "after m016", "--yes")
    assert done.returncode == 0, done.stderr
    assert _scalar(db, "SELECT count(*) FROM erasures WHERE effects_digest IS NOT NULL") == 1
    assert_verified(db, entries)
