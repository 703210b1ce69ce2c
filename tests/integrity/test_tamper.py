"""The tamper matrix: every way of altering a copy of a populated log is found, at the right entry."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from benchmarks.logs import generate_log
from conftest import alter
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from topic_audit.integrity import verify
from topic_audit.log import chain, content, rebuild
from topic_audit.transparency import checkpoints
from topic_audit.transparency.checkpoints import Signer, make_checkpoint
from topic_audit.writer.thread import connect

SIZE = 60  # checkpoints after entries 20, 40 and 60


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log of 60 realistic entries with three signed checkpoints (built once, copied per case)."""
    folder = tmp_path_factory.mktemp("populated")
    db = folder / "audit.db"
    signer, _ = Signer.load_or_create(folder / "key.pem")
    for round_ in range(3):
        generate_log(db, 20, seed=round_)
        conn = connect(db)
        make_checkpoint(conn, signer, folder / "cp.jsonl", f"2026-11-25T00:00:0{round_}.000Z")
        conn.close()
    return folder


@pytest.fixture
def copy(populated: Path, tmp_path: Path) -> Path:
    for name in ("audit.db", "cp.jsonl", "key.pem"):
        shutil.copy(populated / name, tmp_path / name)
    return tmp_path


def findings(folder: Path, pinned: str | None = None) -> list[verify.Finding]:
    conn = sqlite3.connect(folder / "audit.db")
    try:
        found, _, _ = verify.verify_all(conn, folder / "cp.jsonl", pinned)
    finally:
        conn.close()
    return found


def tamper(folder: Path, *statements: str, params: tuple[Any, ...] = ()) -> None:
    alter(folder / "audit.db", *statements, params=params)


def first(found: list[verify.Finding]) -> tuple[str, int | None]:
    """(check, entry) of the first bad entry, as ``verify --json`` reports it in ``first_bad_id``."""
    assert found, "tampering went unnoticed"
    entry = verify.first_bad_id(found)
    return next(f.check for f in found if f.entry_id == entry), entry


def test_the_intact_log_passes(copy: Path) -> None:
    assert findings(copy) == []
    assert len(checkpoints.read_file(copy / "cp.jsonl")) == 3


def _edited(column: str) -> str:
    if column in ("id", "status_code", "request_body_bytes", "duplicate_of"):
        return f"{column} = coalesce({column}, 0) + 1000"
    if column == "elapsed_ms":
        return "elapsed_ms = elapsed_ms + 1"
    if column == "outcome":  # the CHECK constraint allows only real outcomes: flip to another one
        return "outcome = CASE outcome WHEN 'accepted' THEN 'ignored' ELSE 'accepted' END"
    if column == "request_body":
        return "request_body = CAST(request_body || ' ' AS BLOB)"
    return f"{column} = coalesce({column}, '') || 'x'"


@pytest.mark.parametrize("column", chain.COLUMNS)
def test_editing_any_column_of_one_row(copy: Path, column: str) -> None:
    tamper(copy, f"UPDATE audit_log SET {_edited(column)} WHERE id = 30")
    assert first(findings(copy))[1] == 30


def test_deleting_a_row(copy: Path) -> None:
    tamper(copy, "DELETE FROM audit_log WHERE id = 30")
    assert first(findings(copy)) == ("ids", 30)


def test_deleting_a_row_and_renumbering(copy: Path) -> None:
    tamper(copy, "DELETE FROM audit_log WHERE id = 30", "UPDATE audit_log SET id = id - 1 WHERE id > 30")
    assert first(findings(copy))[1] == 30


def _row(folder: Path, entry_id: int) -> dict[str, Any]:
    conn = sqlite3.connect(folder / "audit.db")
    conn.row_factory = sqlite3.Row
    row = dict(conn.execute("SELECT * FROM audit_log WHERE id = ?", (entry_id,)).fetchone())
    conn.close()
    return row


def test_inserting_a_forged_row(copy: Path) -> None:
    forged = _row(copy, 30)
    forged.update(id=31, prev_hash=forged["entry_hash"], detail="forged", topic_id="forged-topic")
    forged["entry_hash"] = chain.entry_hash(forged)
    columns = ", ".join(chain.COLUMNS)
    tamper(
        copy,
        *(f"UPDATE audit_log SET id = id + 1 WHERE id = {i}" for i in range(SIZE, 30, -1)),
        f"INSERT INTO audit_log ({columns}) VALUES ({', '.join('?' * len(chain.COLUMNS))})",
        params=tuple(forged[c] for c in chain.COLUMNS),
    )
    found = findings(copy)
    assert verify.Finding("chain", 31, "entry 31 was inserted: entry 32 links past it") in found


def test_reordering_rows(copy: Path) -> None:
    tamper(
        copy,
        "UPDATE audit_log SET id = -1 WHERE id = 30",
        "UPDATE audit_log SET id = 30 WHERE id = 31",
        "UPDATE audit_log SET id = 31 WHERE id = -1",
    )
    assert first(findings(copy))[1] == 30


def test_truncating_the_tail(copy: Path) -> None:
    tamper(copy, "DELETE FROM audit_log WHERE id > 50")
    assert first(findings(copy)) == ("checkpoint_prefix", 51)


def test_rewriting_the_whole_chain_is_caught_by_the_checkpoints(copy: Path) -> None:
    conn = sqlite3.connect(copy / "audit.db")
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM audit_log ORDER BY id")]
    conn.close()
    rows[29]["elapsed_ms"] = 999.0  # entry 30's evidence (its content is committed to under its salt)
    prev = chain.GENESIS
    for row in rows:
        row["prev_hash"] = prev
        row["entry_hash"] = prev = chain.entry_hash(row)
    tamper(copy, "DELETE FROM audit_log")
    conn = sqlite3.connect(copy / "audit.db")
    conn.executemany(
        f"INSERT INTO audit_log ({', '.join(chain.COLUMNS)}) VALUES ({', '.join('?' * len(chain.COLUMNS))})",
        [tuple(r[c] for c in chain.COLUMNS) for r in rows],
    )
    conn.commit()
    conn.close()
    found = findings(copy)
    assert {f.check for f in found} == {"checkpoint_prefix"}  # the chain itself is consistent again
    # The altered entry lies after the last checkpoint that still matches (20) and by the next (40).
    assert first(found) == ("checkpoint_prefix", 21)
    assert "21..40" in found[0].message


def _rewrite_file(folder: Path, lines: list[dict[str, Any]]) -> None:
    (folder / "cp.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_forging_a_checkpoint_line(copy: Path) -> None:
    lines = checkpoints.read_file(copy / "cp.jsonl")
    lines[1]["log_size"] = 39
    _rewrite_file(copy, lines)
    assert "checkpoint_signature" in {f.check for f in findings(copy)}


def test_checkpoints_signed_by_another_key(copy: Path) -> None:
    pinned = Signer.load_or_create(copy / "key.pem")[0].public_key_hex
    other = Signer(Ed25519PrivateKey.generate(), copy / "other.pem")
    (copy / "cp.jsonl").unlink()
    conn = connect(copy / "audit.db")
    conn.execute("DROP TRIGGER checkpoints_no_delete")
    conn.execute("DELETE FROM checkpoints")
    make_checkpoint(conn, other, copy / "cp.jsonl", "2026-11-25T01:00:00.000Z")
    conn.close()
    assert findings(copy) == []  # self-consistent: only a pinned key tells
    assert {f.check for f in findings(copy, pinned)} == {"checkpoint_key"}


def test_removing_a_checkpoint_line(copy: Path) -> None:
    lines = checkpoints.read_file(copy / "cp.jsonl")
    _rewrite_file(copy, [lines[0], lines[2]])
    assert {"checkpoint_chain", "checkpoint_table"} <= {f.check for f in findings(copy)}


def test_a_crash_between_the_checkpoint_file_and_the_table(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the file's fsync, before the table's commit: the next checkpoint catches the table up."""

    class Killed(Exception):
        pass

    def killed(conn: sqlite3.Connection, checkpoint: dict[str, Any]) -> None:
        raise Killed

    signer, _ = Signer.load_or_create(copy / "key.pem")
    conn = connect(copy / "audit.db")
    try:
        with monkeypatch.context() as patch:
            patch.setattr(checkpoints, "_insert", killed)
            with pytest.raises(Killed):
                make_checkpoint(conn, signer, copy / "cp.jsonl", "2026-11-25T00:00:05.000Z")
        assert findings(copy) == []  # the table may lag the file by one
        with (copy / "cp.jsonl").open("a") as f:
            f.write('{"log_size": 60, "head')  # and a later crash cut a line short
        make_checkpoint(conn, signer, copy / "cp.jsonl", "2026-11-25T00:00:06.000Z")
    finally:
        conn.close()
    assert findings(copy) == []
    assert len(checkpoints.read_file(copy / "cp.jsonl")) == 5


def test_deleting_the_checkpoint_file(copy: Path) -> None:
    (copy / "cp.jsonl").unlink()
    assert "checkpoint_file" in {f.check for f in findings(copy)}


def test_editing_the_projection(copy: Path) -> None:
    conn = sqlite3.connect(copy / "audit.db")
    topic_id, entry = conn.execute(
        "SELECT topic_id, updated_entry_id FROM topics ORDER BY topic_id"
    ).fetchone()
    conn.execute("UPDATE topics SET name = 'edited' WHERE topic_id = ?", (topic_id,))
    conn.commit()
    conn.close()
    [found] = findings(copy)
    assert (found.check, found.topic_id, found.entry_id) == ("projection", topic_id, entry)
    assert "name" in found.message


def test_editing_the_topic_counts(copy: Path) -> None:
    tamper(copy, "UPDATE topic_counts SET topics = topics + 1 WHERE state = 'active'")
    [found] = findings(copy)
    assert found.check == "projection" and found.message.startswith("topic_counts is")
    conn = sqlite3.connect(copy / "audit.db", isolation_level=None)
    try:
        rebuild.rebuild(conn)  # derived data: a rebuild sets it right
    finally:
        conn.close()
    assert findings(copy) == []


@pytest.mark.parametrize("change", ["delete", "insert"])
def test_removing_or_adding_a_projected_topic(copy: Path, change: str) -> None:
    conn = sqlite3.connect(copy / "audit.db")
    topic_id, entry = conn.execute(
        "SELECT topic_id, updated_entry_id FROM topics ORDER BY topic_id LIMIT 1 OFFSET 3"
    ).fetchone()
    if change == "delete":
        conn.execute("DELETE FROM topics WHERE topic_id = ?", (topic_id,))
    else:
        topic_id = topic_id[:-1]  # sorts just before an existing topic
        conn.execute("INSERT INTO topics (topic_id, updated_entry_id) VALUES (?, ?)", (topic_id, entry))
    conn.commit()
    conn.close()
    [found] = findings(copy)
    assert (found.check, found.topic_id, found.entry_id) == ("projection", topic_id, entry)
    assert found.message == ("missing from topics" if change == "delete" else "in topics but not in the log")


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET detail = 'edited' WHERE id = 30",
        "DELETE FROM audit_log WHERE id = 29",  # the first entry of a range when checked in parallel
        "DELETE FROM audit_log WHERE id = 28",  # the last entry of a range
        "UPDATE audit_log SET id = 1000 + id WHERE id >= 33",
        "UPDATE audit_log SET prev_hash = (SELECT entry_hash FROM audit_log WHERE id = 27) WHERE id = 29",
    ],
)
def test_verifying_in_parallel_ranges_finds_the_same(
    copy: Path, monkeypatch: pytest.MonkeyPatch, statement: str
) -> None:
    tamper(copy, statement)
    single = findings(copy)
    assert single
    monkeypatch.setattr(verify, "PARALLEL_FROM", 0)  # ranges of 4 entries: (0, 4], (4, 8], …
    assert findings(copy) == single


@pytest.mark.parametrize("column", ["detail", "request_headers", "topic_id"])
def test_a_value_stored_as_a_blob(copy: Path, column: str) -> None:
    """Same bytes, another type: the canonical form of a BLOB differs (msgspec writes it as base64)."""
    tamper(copy, f"UPDATE audit_log SET {column} = CAST(coalesce({column}, '') AS BLOB) WHERE id = 30")
    expected = "content" if column in content.CONTENT else "hash"  # content: under the entry's salt
    assert first(findings(copy)) == (expected, 30)
