"""The tree check (topic_audit.integrity.tree) through `verify` and `watch`: an intact log has no tree
findings; an edited entry, a forged note root, a wrong stored tile and a re-signed rewritten history
(a fork, which `watch` reports) each give theirs."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from benchmarks.logs import generate_log
from topic_audit import clock
from topic_audit.integrity.verify import verify_all
from topic_audit.integrity.watch import Watch
from topic_audit.transparency import note, tlog, tree
from topic_audit.transparency.checkpoints import Signer, make_checkpoint, statement_bytes
from topic_audit.writer.thread import connect

ORIGIN = "topic-audit/1400000000"


def build(db: Path, key: Path, sizes: tuple[int, ...], seed: int, grown: int = 0) -> None:
    signer = Signer.load_or_create(key)[0]
    for size in sizes:
        generate_log(db, size - grown, seed=seed + size)
        grown = size
        conn = connect(db)
        make_checkpoint(
            conn, signer, db.with_name(db.name + ".checkpoints.jsonl"), clock.iso(0), origin=ORIGIN
        )
        conn.close()


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("tree") / "audit.db"
    build(db, db.with_name("key.pem"), (100, 300, 600), seed=1)
    return db


@pytest.fixture
def copy(original: Path, tmp_path: Path) -> Path:
    db = tmp_path / "audit.db"
    for suffix in ("", ".checkpoints.jsonl"):
        shutil.copy(f"{original}{suffix}", f"{db}{suffix}")
    shutil.copy(original.with_name("key.pem"), tmp_path / "key.pem")
    return db


def findings(db: Path) -> dict[str, str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        found, _, _ = verify_all(conn, db.with_name(db.name + ".checkpoints.jsonl"), None, False)
    finally:
        conn.close()
    return {f.check: f.message for f in found}


def test_an_intact_log_has_no_tree_findings(copy: Path) -> None:
    assert findings(copy) == {}


def test_an_edited_entry_rehashed_breaks_the_signed_roots(copy: Path) -> None:
    conn = sqlite3.connect(copy)
    conn.execute("DROP TRIGGER audit_log_no_update")
    conn.execute("UPDATE audit_log SET entry_hash = ? WHERE id = 150", ("ab" * 32,))
    conn.commit()
    conn.close()
    found = findings(copy)
    assert (
        "checkpoint 2: its note's root is not the tree of the log's first 300 entries"
        in found["checkpoint_tree"]
    )
    assert "entries 101..300" in found["checkpoint_tree"]


def test_a_wrong_stored_tile_is_found(copy: Path) -> None:
    conn = sqlite3.connect(copy)
    conn.execute("UPDATE tree_hashes SET hash = ? WHERE level = 1 AND idx = 1", (bytes(32),))
    conn.commit()
    conn.close()
    assert "the stored hash of entries 257..512" in findings(copy)["tree_hashes"]


def test_a_note_re_signed_with_another_root_is_found(copy: Path) -> None:
    file = copy.with_name("audit.db.checkpoints.jsonl")
    lines = [json.loads(line) for line in file.read_text().splitlines()]
    key = Signer.load_or_create(copy.with_name("key.pem"))[0].key
    last = lines[-1]
    last["note"] = note.sign(note.Checkpoint(ORIGIN, 600, bytes(32)).text(), ORIGIN, key)
    signed = statement_bytes(last)

    last["digest"], last["signature"] = hashlib.sha256(signed).hexdigest(), key.sign(signed).hex()
    file.write_text("".join(json.dumps(cp, sort_keys=True) + "\n" for cp in lines))
    found = findings(copy)
    assert "checkpoint 3: its note's root is not the tree" in found["checkpoint_tree"]


def test_watch_reports_a_rewritten_history_re_signed_with_the_same_key(copy: Path, tmp_path: Path) -> None:
    watch = Watch(copy, copy.with_name("audit.db.checkpoints.jsonl"), sweep_entries=100)
    assert watch.round().findings == []
    forged = tmp_path / "forged" / "audit.db"
    forged.parent.mkdir()
    build(forged, copy.with_name("key.pem"), (600, 700), seed=99)  # another history, the same key
    for suffix in ("", ".checkpoints.jsonl"):
        shutil.copy(f"{forged}{suffix}", f"{copy}{suffix}")
    checks = {f.check: f.message for f in watch.round().findings}
    assert "does not extend checkpoint 3 (size 600)" in checks["checkpoint_consistency"]


def test_the_tree_check_follows_the_log_round_by_round(copy: Path) -> None:
    watch = Watch(copy, copy.with_name("audit.db.checkpoints.jsonl"), sweep_entries=100)
    assert watch.round().findings == []
    build(copy, copy.with_name("key.pem"), (900,), seed=7, grown=600)
    assert watch.round().findings == []
    tree_check = watch.checker.tree
    assert tree_check.frontier.size == 900 and tree_check.matched == 900
    conn = sqlite3.connect(copy)
    assert tlog.root(tree.StoredTree(conn, 900), 900) == tree_check.frontier.root()
    conn.close()
