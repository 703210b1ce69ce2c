"""Erasure: a data subject's values leave every database file, the evidence and the chain stay, and
``verify`` still passes. Forgetting is proven by scanning the raw bytes of the database, ``-wal`` and
``-shm`` files, never by querying."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    OTHER,
    SUBJECT,
    SUBJECT_IP,
    Post,
    Server,
    findings,
    forge,
    holding,
    message,
    rows,
    run_cli,
    send,
    topics,
)
from sqlite_utils import Database
from topic_audit.log import chain, content, search
from topic_audit.privacy import erasure, purge, records
from topic_audit.privacy.purge import connect
from topic_audit.settings import Settings
from topic_audit.tencent import samples
from topic_audit.transparency.checkpoints import Signer, record_key

# FTS5 stores a term after the prefix it shares with the term before it: the scan looks for the part of
# the term no other word in the test shares, so that a term left in an index segment is found.
SECRET = "zqxjkvrendezvous"
SECRET_TAIL = SECRET[3:].encode()


def test_erase_an_account_while_serve_runs_leaves_no_copy(server: Server, tmp_path: Path) -> None:
    db = server.db
    bodies = [
        message(SUBJECT, f"meet me, the {SECRET} place"),
        samples.sample(
            "after-create", TopicId="@TGS#_erasure@TOPIC#_1", Operator_Account=SUBJECT, Owner_Account=SUBJECT
        ),
        samples.sample(
            "info-changed", TopicId="@TGS#_erasure@TOPIC#_1", Operator_Account=OTHER, Name="kept name"
        ),
        message(OTHER, "nothing personal here"),
    ]
    for i, body in enumerate(bodies):
        ip = SUBJECT_IP if i == 0 else "198.51.100.1"
        assert send(server.url, body, ip).status_code == 200
    erased_bodies = [r for r in rows(db) if SUBJECT in (r["request_body"] or "")]
    assert [r["id"] for r in erased_bodies] == [1, 2]
    sha_hex = [r["request_body_sha256"].encode() for r in erased_bodies]
    sha_raw = [bytes.fromhex(r["request_body_sha256"]) for r in erased_bodies]
    # Every needle is there before: the scan can find what it looks for.
    conn = connect(db)
    search.index_everything(conn)
    conn.close()
    for needle in (SUBJECT.encode(), SUBJECT_IP.encode(), SECRET_TAIL, *sha_hex):
        assert holding(db, needle), needle

    env = {**server.env}
    dry = run_cli(
        "erase", "--db", str(db), "--account", SUBJECT, "--reason", "data subject request #7", env=env
    )
    assert dry.returncode == 0, dry.stderr
    assert "would erase 2 entries" in dry.stdout
    assert holding(db, SUBJECT.encode())  # a dry run changes nothing

    done = run_cli(
        "erase",
        "--db",
        str(db),
        "--account",
        SUBJECT,
        "--reason",
        "data subject request #7",
        "--yes",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "erased 2 entries" in done.stdout
    # serve kept answering and recording during and after the erasure
    assert send(server.url, message(OTHER, "after the erasure")).status_code == 200

    for needle in (SUBJECT.encode(), SUBJECT_IP.encode(), SECRET_TAIL, *sha_hex, *sha_raw):
        assert holding(db, needle) == [], needle
    assert holding(db, OTHER.encode())  # other accounts remain
    assert holding(db, b"kept name")

    after = {r["id"]: r for r in rows(db)}
    assert after[1]["request_body"] is None and after[1]["query_string"] == ""
    assert after[1]["callback_command"] == "Group.CallbackAfterSendMsg"  # evidence stays
    assert after[3]["request_body"] is not None
    topic = topics(db)["@TGS#_erasure@TOPIC#_1"]
    assert (
        topic["owner_account"] == "" and topic["name"] == "kept name" and topic["operator_account"] == OTHER
    )

    report = run_cli("verify", "--db", str(db), "--json", env=env)
    assert report.returncode == 0, report.stdout + report.stderr
    rebuilt = run_cli("rebuild-projection", "--db", str(db), env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert topics(db)["@TGS#_erasure@TOPIC#_1"] == topic
    assert run_cli("verify", "--db", str(db), env=env).returncode == 0


@pytest.mark.parametrize("most_levels", [purge.MOST_LEVELS, 0], ids=["merged", "rebuilt"])
def test_fts_terms_linger_until_merged(most_levels: int, post: Post, db_path: Path) -> None:
    """The control for the raw scans: a row deleted from FTS5 the ordinary way leaves its terms in the
    file, so the scan would find an erasure that skipped :func:`purge.purge`; a purge that rebuilds
    the indexes (their structure too long) forgets them as well."""
    for i in range(30):
        post(message(OTHER, f"filler {i} words {i * 7}"))
    post(message(SUBJECT, f"the {SECRET} word"))
    conn = connect(db_path)
    search.index_everything(conn)
    target = conn.execute("SELECT id FROM audit_log WHERE instr(request_body, ?)", (SECRET,)).fetchone()[0]
    batch = erasure.erase_batch(conn, [target], "request", "control", None, "2026-12-02T00:00:00.000Z")
    assert batch is not None
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert holding(db_path, SECRET_TAIL) == ["audit.db"]  # still in an index segment
    assert purge.purge(conn, most_levels=most_levels)
    conn.close()
    assert holding(db_path, SECRET_TAIL) == []


def test_commitment_hides_the_content_and_the_chain_still_verifies(post: Post, db_path: Path) -> None:
    for i in range(6):
        post(message(SUBJECT if i % 2 else OTHER, f"text {i}"))
    conn = connect(db_path)
    erased = erasure.erase(conn, [2, 4], "request", "test", None, "2026-12-02T00:00:00.000Z")
    conn.close()
    assert erased.entries == 2
    after = {r["id"]: r for r in rows(db_path)}
    assert all(r["content_commitment"] for r in after.values())
    conn = sqlite3.connect(db_path)
    salts = {i for (i,) in conn.execute("SELECT entry_id FROM content_keys")}
    conn.close()
    assert salts == {1, 3, 5, 6}
    assert findings(db_path) == []


@pytest.mark.parametrize(
    "args, message_part",
    [
        (["--account", SUBJECT], "--reason is required"),
        (["--reason", "x"], "exactly one of"),
        (["--account", SUBJECT, "--ip", SUBJECT_IP, "--reason", "x"], "exactly one of"),
        (["--from-id", "5", "--reason", "x"], "--from-id and --to-id go together"),
        (["--nickname", "x", "--reason", "x"], "No such option"),
    ],
)
def test_erase_refuses_bad_input(args: list[str], message_part: str, db_path: Path, post: Post) -> None:
    post(message(OTHER, "x"))
    done = run_cli("erase", "--db", str(db_path), *args)
    assert done.returncode == 2
    assert message_part in done.stderr


def test_erase_matching_nothing_says_0_entries(db_path: Path, post: Post) -> None:
    post(message(OTHER, "x"))
    done = run_cli("erase", "--db", str(db_path), "--account", "nobody", "--reason", "x", "--yes")
    assert done.returncode == 0, done.stderr
    assert "erased 0 entries" in done.stdout


def test_retain_parses_durations(db_path: Path, post: Post) -> None:
    post(message(OTHER, "x"))
    bad = run_cli("retain", "--db", str(db_path), "--older-than", "ninety days")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    done = run_cli("retain", "--db", str(db_path), "--older-than", "1d")
    assert done.returncode == 0 and "erased 0 entries" in done.stdout
    done = run_cli("retain", "--db", str(db_path), "--older-than", "0s")
    assert done.returncode == 0 and "erased 1 entries" in done.stdout, done.stdout
    assert findings(db_path) == []


BLANK = (
    "query_string = '', client_ip = NULL, request_headers = '', request_body = NULL, "
    "request_body_sha256 = '', response_body = '', detail = NULL"
)


@pytest.fixture
def erased_log(post: Post, db_path: Path, client: Any) -> Path:
    """Ten entries, 3 and 4 erased by record 1, 7 by record 2."""
    for i in range(10):
        post(message(SUBJECT if i in (2, 3, 6) else OTHER, f"text {i}"))
    conn = connect(db_path)
    key = record_key(Settings(db=db_path).signing_key_path, create=True)  # what erase signs its records with
    erasure.erase(conn, [3, 4], "request", "first", None, "2026-12-02T00:00:00.000Z", key=key)
    erasure.erase(conn, [7], "request", "second", None, "2026-12-02T00:00:01.000Z", key=key)
    conn.close()
    return db_path


@pytest.mark.parametrize(
    "statements, check, entry_id",
    [
        ([f"UPDATE audit_log SET {BLANK} WHERE id = 5"], "body", 5),
        (["DELETE FROM content_keys WHERE entry_id = 5"], "content", 5),
        (["UPDATE audit_log SET detail = 'edited' WHERE id = 5"], "content", 5),
        (["UPDATE erasures SET reason = 'edited' WHERE id = 1"], "erasure_hash", None),
        (["DELETE FROM erasures WHERE id = 2"], "erasure_entries", 7),
        (
            [
                f"UPDATE audit_log SET {BLANK} WHERE id = 5",
                "DELETE FROM content_keys WHERE entry_id = 5",
                "INSERT INTO erased_entries (entry_id, erasure_id) VALUES (5, 1)",
            ],
            "erasure_entries",
            3,
        ),
        (["DELETE FROM erased_entries WHERE entry_id = 4"], "content", 4),
        (["UPDATE audit_log SET outcome = 'rejected' WHERE id = 3"], "hash", 3),
        (["UPDATE audit_log SET request_body = 'back' WHERE id = 3"], "erasure", 3),
        (["UPDATE erased_entries SET effects = '{}' WHERE entry_id = 4"], "erasure_effects", 3),
    ],
    ids=[
        "content-blanked-without-record",
        "salt-deleted-without-record",
        "content-edited",
        "record-edited",
        "record-deleted",
        "erasure-applied-to-more-than-recorded",
        "entry-unlisted-from-its-record",
        "evidence-of-an-erased-entry-changed",
        "content-put-back-into-an-erased-entry",
        "effects-of-an-erased-entry-changed",
    ],
)
def test_tampering_around_erasures_is_found(
    erased_log: Path, statements: list[str], check: str, entry_id: int | None
) -> None:
    assert findings(erased_log) == []
    forge(erased_log, *statements)
    found = findings(erased_log)
    assert (check, entry_id) in [(f["check"], f["entry_id"]) for f in found], found


def test_an_erase_killed_halfway_leaves_complete_records_and_can_be_finished(tmp_path: Path) -> None:
    from benchmarks.logs import generate_log

    db = tmp_path / "audit.db"
    generate_log(db, 6000, seed=3)
    Signer.load_or_create(tmp_path / "checkpoint-signing.key")  # erase keys its selector digests with it
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "topic_audit.cli",
            "erase",
            "--db",
            str(db),
            "--from-id",
            "1",
            "--to-id",
            "6000",
            "--reason",
            "killed halfway",
            "--yes",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        conn = sqlite3.connect(db, timeout=5)
        recorded = conn.execute("SELECT count(*) FROM erasures").fetchone()[0]
        conn.close()
        if recorded >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    conn = sqlite3.connect(db)
    records, listed = conn.execute("SELECT count(*), coalesce(sum(entries), 0) FROM erasures").fetchone()
    erased = conn.execute("SELECT count(*) FROM erased_entries").fetchone()[0]
    conn.close()
    assert 2 <= records < 12 and listed == erased  # every record complete, and no entry erased without one
    assert findings(db) == []
    done = run_cli(
        "erase", "--db", str(db), "--from-id", "1", "--to-id", "6000", "--reason", "finish", "--yes"
    )
    assert done.returncode == 0, done.stderr
    assert f"erased {6000 - erased} entries" in done.stdout
    assert findings(db) == []


def test_a_consistently_rewritten_erasure_record_is_caught_by_the_checkpoints(erased_log: Path) -> None:
    signed = run_cli("checkpoint", "--db", str(erased_log))
    assert signed.returncode == 0, signed.stderr
    conn = sqlite3.connect(erased_log)
    conn.row_factory = sqlite3.Row
    record = dict(conn.execute("SELECT * FROM erasures WHERE id = 2").fetchone())
    conn.close()
    record["reason"] = "nothing to see"
    forge(
        erased_log,
        f"UPDATE erasures SET reason = 'nothing to see', entry_hash = '{records.record_hash(record)}' WHERE id = 2",
    )
    found = findings(erased_log)
    # the signed head of erasures no longer matches, and the record's own signature no longer does
    assert sorted(f["check"] for f in found) == ["checkpoint_erasures", "erasure_signature"], found


def test_erase_says_when_the_replica_forgets(db_path: Path, post: Post) -> None:
    post(message(SUBJECT, "x"))
    env = {**os.environ, "TOPIC_AUDIT_REPLICA_URL": "s3://bucket/prefix"}
    done = run_cli("erase", "--db", str(db_path), "--account", SUBJECT, "--reason", "x", "--yes", env=env)
    assert done.returncode == 0, done.stderr
    assert "the off-box replica keeps older snapshots holding these values until" in done.stdout


def escaped(body: dict[str, Any], spelled: str, as_written: str) -> bytes:
    """``body`` as JSON (non-ASCII as ``\\uXXXX``) with the string ``spelled`` written ``as_written``."""
    return json.dumps(body).replace(json.dumps(spelled), f'"{as_written}"').encode()


@pytest.mark.parametrize(
    "account, as_written",
    [
        ("renée_42", "ren\\u00e9e_42"),
        ('o"hara_42', 'o\\"hara_42'),
        ("tenant/erin_42", "tenant\\/erin_42"),
        ("erin_42", "\\u0065rin_42"),  # any character may be written as an escape
    ],
    ids=["non-ascii", "quote", "slash", "escaped-ascii"],
)
def test_erase_finds_an_account_written_with_escapes(
    account: str, as_written: str, db_path: Path, post: Post
) -> None:
    post(escaped(message(account, "qzvhello"), account, as_written), "Group.CallbackAfterSendMsg")
    post(escaped(message(OTHER, "qzvhi", to=account), account, as_written), "Group.CallbackAfterSendMsg")
    post(message(f"{account}0", "a longer account holding it"))  # written as is: not the subject
    post(message(OTHER, f"a text naming {account} is not an account field"))
    assert holding(db_path, b"qzvhello") == holding(db_path, b"qzvhi") == ["audit.db-wal"]
    Signer.load_or_create(db_path.with_name("checkpoint-signing.key"))
    args = ("erase", "--db", str(db_path), "--account", account, "--reason", "request #9")
    assert "would erase 2 entries (1, 2)" in run_cli(*args).stdout
    done = run_cli(*args, "--yes")
    assert done.returncode == 0, done.stderr
    assert "erased 2 entries" in done.stdout
    assert holding(db_path, b"qzvhello") == holding(db_path, b"qzvhi") == []
    assert [r["id"] for r in rows(db_path) if r["request_body"] is None] == [1, 2]
    assert findings(db_path) == []


def test_erase_finds_a_topic_written_with_escapes(db_path: Path, post: Post) -> None:
    topic, as_written = "@TGS#_erasure@TOPIC#_café", "@TGS#_erasure@TOPIC#_caf\\u00e9"
    created = samples.sample("after-create", TopicId=topic, GroupId="@TGS#_erasure", Name="qzvcafename")
    post(escaped(created, topic, as_written), created["CallbackCommand"])
    other = f"{samples.DOC_TOPIC}-other"
    destroyed = samples.sample("destroyed", GroupId="@TGS#_erasure", TopicIdList=[other, topic])
    post(escaped(destroyed, topic, as_written), destroyed["CallbackCommand"])
    post(samples.sample("after-create", TopicId=other, GroupId="@TGS#_erasure"))
    Signer.load_or_create(db_path.with_name("checkpoint-signing.key"))
    done = run_cli("erase", "--db", str(db_path), "--topic", topic, "--reason", "request #10", "--yes")
    assert done.returncode == 0, done.stderr
    assert "erased 2 entries" in done.stdout
    assert [r["id"] for r in rows(db_path) if r["request_body"] is None] == [1, 2]
    # The topic's id is evidence (its entries and its projected row keep it); what its events said is not.
    assert holding(db_path, as_written.encode()) == [] and holding(db_path, b"qzvcafename") == []
    assert findings(db_path) == []


def test_effects_edited_with_the_projection_to_match_is_found(db_path: Path, post: Post) -> None:
    """What the projection replays for an erased topic event is committed to by its record: editing it
    and the projection alike (so that the projection still equals a rebuild) is a finding."""
    topic = "@TGS#_erasure@TOPIC#_effects"
    post(samples.sample("after-create", TopicId=topic, Operator_Account=SUBJECT, Name="qzvname"))
    conn = connect(db_path)
    erasure.erase(conn, [1], "request", "effects", None, "2026-12-02T00:00:00.000Z")
    (effects,) = conn.execute("SELECT effects FROM erased_entries WHERE entry_id = 1").fetchone()
    conn.close()
    assert json.loads(effects)["Name"] == ""
    assert findings(db_path) == []
    forged = json.dumps({**json.loads(effects), "Name": "forged"}, sort_keys=True, separators=(",", ":"))
    forge(
        db_path,
        f"UPDATE erased_entries SET effects = '{forged}' WHERE entry_id = 1",
        f"UPDATE topics SET name = 'forged' WHERE topic_id = '{topic}'",
    )
    assert topics(db_path)[topic]["name"] == "forged"
    found = findings(db_path)
    assert [(f["check"], f["entry_id"]) for f in found] == [("erasure_effects", 1)], found


def hashed_with_the_content(db: Path) -> None:
    """The log's entries as the code before keyed commitments (m014) wrote them: no commitment, no salt,
    each hash over the content itself (the chain recomputed)."""
    written = rows(db)
    prev, links = chain.GENESIS, []
    for row in written:
        row["prev_hash"], row["content_commitment"] = prev, None
        row["entry_hash"] = prev = chain.entry_hash(row)
        links.append(
            f"UPDATE audit_log SET prev_hash = '{row['prev_hash']}', entry_hash = '{prev}', "
            f"content_commitment = NULL WHERE id = {row['id']}"
        )
    # a log migrated from that time: keyed commitments begin after its entries (log_facts, m017)
    first = len(written) + 1
    forge(
        db,
        "DELETE FROM content_keys",
        f"UPDATE log_facts SET value = {first} WHERE name = 'commitments_from'",
        *links,
    )
    restore_triggers(db)


def restore_triggers(db: Path) -> None:
    from topic_audit.log.migrations import migrations

    fresh = db.with_name("schema.db")
    conn = sqlite3.connect(fresh)
    conn.close()
    migrations.apply(Database(fresh))
    source = sqlite3.connect(fresh)
    triggers = [sql for (sql,) in source.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger'")]
    source.close()
    conn = sqlite3.connect(db)
    for sql in triggers:
        conn.execute(sql)
    conn.commit()
    conn.close()


@pytest.mark.parametrize("legacy", [True, False], ids=["before-commitments", "committed"])
def test_erase_refuses_an_entry_changed_since_it_was_written(legacy: bool, db_path: Path, post: Post) -> None:
    """Blanking an entry that no longer matches its hash would launder it: before keyed commitments its
    hash is not checked once erased, and with one, the commitment's salt goes with the content."""
    for i in range(4):
        post(message(SUBJECT if i == 1 else OTHER, f"text {i}"))
    if legacy:
        hashed_with_the_content(db_path)
    assert findings(db_path) == []
    forge(db_path, "UPDATE audit_log SET detail = 'edited' WHERE id = 2")
    restore_triggers(db_path)
    before = [(f["check"], f["entry_id"]) for f in findings(db_path)]
    assert before == [("hash" if legacy else "content", 2)]
    Signer.load_or_create(db_path.with_name("checkpoint-signing.key"))
    for yes in ((), ("--yes",)):
        done = run_cli("erase", "--db", str(db_path), "--account", SUBJECT, "--reason", "launder", *yes)
        assert done.returncode == 1 and done.stdout == "", done.stdout
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        why = "does not match its entry_hash" if legacy else "has content that does not match its commitment"
        assert f"entry 2 {why}: not erasing it" in done.stderr, done.stderr
    assert rows(db_path)[1]["detail"] == "edited"  # nothing erased
    assert [(f["check"], f["entry_id"]) for f in findings(db_path)] == before  # still found
    clean = run_cli("erase", "--db", str(db_path), "--id", "3", "--reason", "an intact entry", "--yes")
    assert clean.returncode == 0 and "erased 1 entries" in clean.stdout, clean.stderr
    assert [(f["check"], f["entry_id"]) for f in findings(db_path)] == before


def untouched(db: Path) -> tuple[bytes, int, bytes]:
    """What a dry run must leave as it was: the database file's bytes and mtime, and the WAL's bytes."""
    wal = Path(f"{db}-wal")
    return db.read_bytes(), db.stat().st_mtime_ns, wal.read_bytes() if wal.exists() else b""


def test_a_dry_run_opens_the_database_read_only(db_path: Path, post: Post, tmp_path: Path) -> None:
    for i in range(3):
        post(message(SUBJECT if i == 1 else OTHER, f"text {i}"))
    db = tmp_path / "copy" / "audit.db"  # away from the receiver, which goes on writing its own
    db.parent.mkdir()
    source, target = sqlite3.connect(db_path), sqlite3.connect(db)
    source.backup(target)
    target.execute("PRAGMA journal_mode=WAL")
    source.close()
    target.close()
    before = untouched(db)
    time.sleep(0.01)  # an mtime written now would differ
    done = run_cli("erase", "--db", str(db), "--account", SUBJECT, "--reason", "x")
    assert done.returncode == 0, done.stderr
    assert "dry run (database opened read-only, nothing written): would erase 1 entries (2)" in done.stdout
    assert untouched(db) == before


def test_a_dry_run_does_not_migrate(db_path: Path, post: Post, tmp_path: Path) -> None:
    """A log written before erasures existed (m014) is read as it is, and left so."""
    from topic_audit.log.migrations import migrations

    for i in range(3):
        post(message(SUBJECT if i == 1 else OTHER, f"text {i}"))
    old = tmp_path / "old" / "audit.db"
    old.parent.mkdir()
    migrations.apply(Database(old), stop_before="m014_forgetting")
    conn = sqlite3.connect(old)
    columns = [r[1] for r in conn.execute("PRAGMA table_info(audit_log)")]
    prev = chain.GENESIS
    for row in rows(db_path):
        row["prev_hash"], row["content_commitment"] = prev, None
        row["entry_hash"] = prev = chain.entry_hash(row)
        conn.execute(
            f"INSERT INTO audit_log ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            [row[c] for c in columns],
        )
    conn.commit()
    conn.close()
    applied = sqlite3.connect(old).execute("SELECT count(*) FROM _sqlite_migrations").fetchone()
    before = untouched(old)
    time.sleep(0.01)
    done = run_cli("erase", "--db", str(old), "--account", SUBJECT, "--reason", "x")
    assert done.returncode == 0, done.stderr
    assert "would erase 1 entries (2)" in done.stdout
    assert untouched(old) == before
    assert sqlite3.connect(old).execute("SELECT count(*) FROM _sqlite_migrations").fetchone() == applied


def unguarded(conn: sqlite3.Connection, entry_id: int) -> list[str]:
    """The evidence columns of ``audit_log`` that an UPDATE of the erased entry ``entry_id`` may change:
    each change is tried, and rolled back."""
    columns = [r[1] for r in conn.execute("PRAGMA table_info(audit_log)")]
    opened = []
    for column in (c for c in columns if c not in content.CONTENT):
        conn.execute("BEGIN")
        try:
            conn.execute(
                f"UPDATE audit_log SET {column} = CASE WHEN {column} IS 7 THEN 8 ELSE 7 END WHERE id = ?",
                (entry_id,),
            )
            opened.append(column)
        except sqlite3.IntegrityError as exc:
            assert "append-only" in str(exc), (column, exc)
        conn.execute("ROLLBACK")
    return opened


def test_the_update_trigger_guards_every_evidence_column(erased_log: Path) -> None:
    """The trigger that lets an erasure blank content lists the evidence columns it keeps (m014): a
    column added later must be added to it too, or an UPDATE could change that column of an erased
    entry."""
    conn = sqlite3.connect(erased_log, isolation_level=None)
    try:
        assert [r[1] for r in conn.execute("PRAGMA table_info(audit_log)")] == list(chain.COLUMNS)
        assert unguarded(conn, 3) == []
        conn.execute("ALTER TABLE audit_log ADD COLUMN added_later TEXT")  # the hole this test is for
        assert unguarded(conn, 3) == ["added_later"]
    finally:
        conn.close()


def test_a_thousand_purges_keep_the_index_sound(tmp_path: Path) -> None:
    """SQLite 3.40's FTS5 adds a level to an index's structure with every negative merge that merges,
    and reports the index corrupt ("database disk image is malformed") past 2,000: here a purge's merge
    steps after each row another connection adds, as the indexer and erasures interleave (without the
    rebuild, the 1,554th purge fails)."""
    db = tmp_path / "fts.db"
    indexer = sqlite3.connect(db, isolation_level=None)
    indexer.execute("PRAGMA journal_mode=WAL")
    indexer.execute("CREATE VIRTUAL TABLE t USING fts5(x)")
    purging = connect(db)
    rebuilt = 0
    for i in range(1, 1801):
        indexer.execute("INSERT INTO t (rowid, x) VALUES (?, ?)", (i, f"word{i} other{i % 7}"))
        if i % 3 == 0:
            indexer.execute("DELETE FROM t WHERE rowid = ?", (i - 1,))
        before = purge.levels(purging, "t")
        assert any(purge.merge_step(purging, "t", 64) for _ in range(purge.MERGE_STEPS))
        rebuilt += purge.levels(purging, "t") < before
        assert purge.levels(purging, "t") <= purge.MOST_LEVELS
    assert rebuilt >= 1
    purging.execute("INSERT INTO t (t) VALUES ('integrity-check')")
    assert purging.execute("SELECT count(*) FROM t WHERE t MATCH 'word1799'").fetchone() == (0,)
    assert purging.execute("SELECT count(*) FROM t WHERE t MATCH 'word1800'").fetchone() == (1,)
    indexer.close()
    purging.close()


def test_erase_refuses_a_row_holding_a_value_of_the_wrong_type(db_path: Path, post: Post) -> None:
    """A row altered to hold what the receiver never writes (an integer body) is refused in one line,
    not with a traceback."""
    post(message(SUBJECT, "typed"))
    forge(db_path, "UPDATE audit_log SET request_body = 5 WHERE id = 1")
    Signer.load_or_create(Settings(db=db_path).signing_key_path)
    done = run_cli("erase", "--db", str(db_path), "--id", "1", "--reason", "typed", "--yes")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "entry 1 " in done.stderr and "not erasing it" in done.stderr, done.stderr
