"""The stored tree, the checkpoint notes, `prove` and `check-receipt`, on real logs in SQLite files.

The stored tree must give exactly the in-memory tree's roots and proofs (which tests/transparency/test_tlog.py checks
against an independent verifier), with tiles of 4 hashes (so that trees of 1 to 70 leaves reach three
stored levels) and of 256; then receipts made by `topic-audit prove` are checked offline, and every
kind of tampering is refused with one line saying which.
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tlog_reference as reference
from benchmarks.logs import generate_log
from click.testing import CliRunner
from conftest import ROOT
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from topic_audit import cli, clock
from topic_audit.transparency import note, tlog, tree
from topic_audit.transparency.checkpoints import Signer, make_checkpoint, signature_ok
from topic_audit.writer.thread import connect

ORIGIN = "topic-audit/1400000000"
ENTRIES = 600


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 600-entry log with checkpoints at 70, 300 and 600 entries (tree tiles of 256)."""
    db = tmp_path_factory.mktemp("receipts") / "audit.db"
    signer, _ = Signer.load_or_create(db.with_name("checkpoint-signing.key"))
    for grown, size in ((0, 70), (70, 300), (300, ENTRIES)):
        generate_log(db, size - grown, seed=size)
        conn = connect(db)
        make_checkpoint(conn, signer, db.with_name("audit.db.checkpoints.jsonl"), clock.iso(0), origin=ORIGIN)
        conn.close()
    return db


def leaves(db: Path) -> list[bytes]:
    conn = sqlite3.connect(db)
    try:
        return [
            tlog.leaf_hash(bytes.fromhex(h))
            for (h,) in conn.execute("SELECT entry_hash FROM audit_log ORDER BY id")
        ]
    finally:
        conn.close()


def run(*args: str) -> Any:
    return CliRunner().invoke(cli.main, list(args))


@pytest.mark.parametrize("tile_height", [2, 8])
def test_the_stored_tree_is_the_tree(log: Path, tmp_path: Path, tile_height: int) -> None:
    db = tmp_path / "copy.db"
    shutil.copy(log, db)
    conn = connect(db)
    conn.execute("DELETE FROM tree_hashes")
    memory = tlog.MemoryTree(leaves(db))
    tree.update(conn, 50, tile_height)  # in steps: as checkpoints come
    tree.update(conn, 301, tile_height)
    added = tree.update(conn, None, tile_height)
    stored = conn.execute("SELECT count(*) FROM tree_hashes").fetchone()[0]
    width = 1 << tile_height
    assert stored == sum(ENTRIES // width**level for level in range(1, 6)) and added > 0
    assert tree.update(conn, None, tile_height) == 0
    for size in [*range(1, 71), 255, 256, 257, 299, 512, ENTRIES]:
        reader = tree.StoredTree(conn, size, tile_height)
        assert tlog.root(reader, size) == tlog.root(memory, size), size
        indexes = range(size) if size <= 70 else (0, 1, size // 2, size - 2, size - 1)
        for index in indexes:
            assert tlog.inclusion_proof(reader, index, size) == tlog.inclusion_proof(memory, index, size)
        for old in range(1, size + 1) if size <= 70 else (1, 70, size - 1):
            assert tlog.consistency_proof(reader, old, size) == tlog.consistency_proof(memory, old, size)
    # tiles not stored yet are computed from the level below
    conn.execute("DELETE FROM tree_hashes WHERE level > 1")
    assert tlog.root(tree.StoredTree(conn, ENTRIES, tile_height), ENTRIES) == tlog.root(memory, ENTRIES)
    conn.close()


def test_every_checkpoint_signs_the_tree_as_a_note(log: Path) -> None:
    lines = [
        json.loads(line) for line in log.with_name("audit.db.checkpoints.jsonl").read_text().splitlines()
    ]
    conn = sqlite3.connect(log)
    stored = [r[0] for r in conn.execute("SELECT note FROM checkpoints ORDER BY id")]
    conn.close()
    key = Signer.load_or_create(log.with_name("checkpoint-signing.key"))[0]
    verifier = note.Verifier.for_key(ORIGIN, note.raw_public_key(key.key))
    memory = tlog.MemoryTree(leaves(log))
    assert [cp["note"] for cp in lines] == stored
    for cp in lines:
        body = note.Checkpoint.parse(note.open_note(cp["note"], verifier))
        assert (body.origin, body.size, body.root) == (
            ORIGIN,
            cp["log_size"],
            tlog.root(memory, cp["log_size"]),
        )
        assert signature_ok(cp)
        assert (
            not signature_ok({**cp, "note": stored[0]}) or cp["note"] == stored[0]
        )  # the statement signs the note
    vkey = run("public-key", "--db", str(log), "--vkey").output.strip()
    assert vkey == verifier.vkey
    assert run("public-key", "--db", str(log), "--vkey", "--sdkappid", "1").output.startswith(
        "topic-audit/1+"
    )


def vkey_of(log: Path) -> str:
    return str(run("public-key", "--db", str(log), "--vkey").output.strip())


@pytest.mark.parametrize("entry_id", [1, 69, 70, 71, 256, 257, 599, 600])
@pytest.mark.parametrize("fmt", ["json", "tlog-proof"])
def test_receipts_check_offline_and_independently(log: Path, tmp_path: Path, entry_id: int, fmt: str) -> None:
    made = run("prove", "--db", str(log), "--id", str(entry_id), "--format", fmt)
    assert made.exit_code == 0, made.output
    path = tmp_path / "receipt"
    path.write_text(made.output)
    checked = run("check-receipt", str(path), "--public-key", vkey_of(log))
    assert checked.exit_code == 0, checked.output
    assert (
        checked.output.startswith(f"OK: entry {entry_id} ")
        and f"in {ORIGIN} at size {ENTRIES}" in checked.output
    )
    if fmt == "json":
        receipt = json.loads(made.output)
        proof = [base64.b64decode(h) for h in receipt["inclusion"]]
        root = note.Checkpoint.parse(receipt["checkpoint"].split("\n\n")[0] + "\n").root
        leaf = bytes.fromhex(receipt["entry_hash"])
        assert reference.verify_inclusion(leaf, entry_id - 1, ENTRIES, proof, root)


def test_prove_against_an_earlier_checkpoint_and_consistency(log: Path, tmp_path: Path) -> None:
    receipt = json.loads(run("prove", "--db", str(log), "--id", "5", "--size", "70").output)
    assert receipt["tree_size"] == 70
    made = run("prove", "--db", str(log), "--consistency", "70", "600")
    assert made.exit_code == 0, made.output
    doc = json.loads(made.output)
    old, new = (
        note.Checkpoint.parse(doc[k].split("\n\n")[0] + "\n") for k in ("old_checkpoint", "new_checkpoint")
    )
    proof = [base64.b64decode(h) for h in doc["consistency"]]
    assert reference.verify_consistency(70, 600, old.root, new.root, proof)
    (tmp_path / "c.json").write_text(made.output)
    assert run("check-receipt", str(tmp_path / "c.json"), "--public-key", vkey_of(log)).output.startswith(
        "OK: topic-audit/1400000000 at size 600 extends size 70"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--id", "601"], "entry 601 does not exist: the log has 600 entries"),
        (
            ["--id", "100", "--size", "70"],
            "entry 100 is not in checkpoint 1 (size 70, 1970-01-01T00:00:00.000Z): checkpoint 2 (size 300",
        ),
        (
            ["--id", "1", "--size", "71"],
            "no signed checkpoint has size 71; the nearest: checkpoint 1 (size 70",
        ),
        (["--consistency", "300", "70"], "a consistency proof goes from"),
        ([], "give --id N"),
    ],
)
def test_prove_says_why_not(log: Path, args: list[str], message: str) -> None:
    result = run("prove", "--db", str(log), *args)
    assert result.exit_code != 0 and message in result.output, result.output


def test_an_entry_after_the_latest_checkpoint_names_the_next(log: Path, tmp_path: Path) -> None:
    db = tmp_path / "grown.db"
    shutil.copy(log, db)
    generate_log(db, 5, seed=9)
    result = run("prove", "--db", str(db), "--id", "603")
    assert result.exit_code == 1
    assert (
        "entry 603 is not in checkpoint 3 (size 600" in result.output
        and "the next checkpoint" in result.output
    )


def tamper_cases(receipt: dict[str, Any], log: Path) -> list[tuple[str, str, str]]:
    """(what, the receipt text, the one line check-receipt must say)."""
    other_key = Ed25519PrivateKey.generate()
    body = receipt["checkpoint"].split("\n\n")[0] + "\n"
    forged = [base64.b64encode(b"\x00" * 32).decode(), *receipt["inclusion"][1:]]
    edited = f"{int(receipt['entry_hash'][0], 16) ^ 1:x}{receipt['entry_hash'][1:]}"
    other_origin = body.replace(ORIGIN, "topic-audit/999")
    key = Signer.load_or_create(log.with_name("checkpoint-signing.key"))[0].key
    return [
        ("not json", "{", "malformed receipt"),
        ("missing fields", json.dumps({"id": 1}), "malformed receipt: a receipt holds id, leaf_index"),
        ("bad base64", json.dumps({**receipt, "inclusion": ["%%%"]}), "malformed receipt: inclusion"),
        (
            "an edited entry",
            json.dumps({**receipt, "entry_hash": edited}),
            "the inclusion proof does not verify",
        ),
        (
            "a forged proof",
            json.dumps({**receipt, "inclusion": forged}),
            "the inclusion proof does not verify",
        ),
        (
            "another leaf",
            json.dumps({**receipt, "id": 3, "leaf_index": 2}),
            "the inclusion proof does not verify",
        ),
        (
            "another key",
            json.dumps({**receipt, "checkpoint": note.sign(body, ORIGIN, other_key)}),
            "signed by another key",
        ),
        (
            "another origin",
            json.dumps({**receipt, "checkpoint": note.sign(other_origin, "topic-audit/999", key)}),
            "for another origin",
        ),
        (
            "a rewritten root",
            json.dumps(
                {
                    **receipt,
                    "checkpoint": receipt["checkpoint"].replace(
                        body.split("\n")[2], base64.b64encode(bytes(32)).decode()
                    ),
                }
            ),
            "signature does not verify",
        ),
    ]


def test_tampered_receipts_are_refused_with_one_line(log: Path, tmp_path: Path) -> None:
    receipt = json.loads(run("prove", "--db", str(log), "--id", "2").output)
    for what, text, message in tamper_cases(receipt, log):
        path = tmp_path / "receipt.json"
        path.write_text(text)
        result = run("check-receipt", str(path), "--public-key", vkey_of(log))
        assert result.exit_code == 1, what
        assert message in result.output and len(result.output.strip().splitlines()) == 1, (
            what,
            result.output,
        )
    path.write_text(json.dumps(receipt))
    result = run("check-receipt", str(path), "--public-key", vkey_of(log), "--log-origin", "elsewhere/log")
    assert result.exit_code == 1 and "for another origin" in result.output
    result = run("check-receipt", str(path), "--public-key", vkey_of(log), "--entry-hash", "ab" * 32)
    assert result.exit_code == 1 and "the receipt is for entry_hash" in result.output


def test_a_rewritten_history_re_signed_is_not_consistent(log: Path, tmp_path: Path) -> None:
    """The operator rebuilds the log from entry 50 on and re-signs: old receipts' checkpoint cannot be
    extended to the new one."""
    db = tmp_path / "rewritten.db"
    generate_log(db, 300, seed=300 + 1)  # a different history of the same size
    conn = connect(db)
    signer = Signer.load_or_create(log.with_name("checkpoint-signing.key"))[0]
    make_checkpoint(conn, signer, tmp_path / "cp.jsonl", clock.iso(0), origin=ORIGIN)
    conn.close()
    generate_log(db, 100, seed=5)
    conn = connect(db)
    make_checkpoint(conn, signer, tmp_path / "cp.jsonl", clock.iso(0), origin=ORIGIN)
    conn.close()
    genuine = json.loads(run("prove", "--db", str(log), "--consistency", "70", "300").output)
    forged = json.loads(run("prove", "--db", str(db), "--consistency", "300", "400").output)
    old = json.loads(run("prove", "--db", str(log), "--consistency", "300", "600").output)["old_checkpoint"]
    doc = {**forged, "old_checkpoint": old}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    result = run("check-receipt", str(tmp_path / "c.json"), "--public-key", vkey_of(log))
    assert result.exit_code == 1 and "the consistency proof does not verify" in result.output
    assert genuine["new_checkpoint"] == old


def test_check_receipt_takes_the_key_as_hex_pem_or_vkey_without_a_database(log: Path, tmp_path: Path) -> None:
    receipt = tmp_path / "receipt.json"
    receipt.write_text(run("prove", "--db", str(log), "--id", "7").output)
    pem = tmp_path / "log.pem"
    pem.write_text(run("public-key", "--db", str(log)).output)
    hex_key = run("public-key", "--db", str(log), "--hex").output.strip()
    for key in (hex_key, str(pem), vkey_of(log)):
        result = subprocess.run(
            [sys.executable, "-m", "topic_audit.cli", "check-receipt", str(receipt)],
            env={
                "TOPIC_AUDIT_PUBLIC_KEY": key,
                "TOPIC_AUDIT_SDKAPPID": "1400000000",
                "PATH": "/usr/bin:/bin",
            },
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("OK: entry 7 ")
    bad = run("check-receipt", str(receipt), "--public-key", "not a key")
    assert bad.exit_code == 2 and "not a public key" in bad.output


def test_the_readme_script_checks_a_real_receipt(log: Path, tmp_path: Path) -> None:
    readme = (ROOT / "docs" / "log-format.md").read_text(encoding="utf-8")
    script = readme.split("\n## Receipts and proofs\n", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    (tmp_path / "log.vkey").write_text(vkey_of(log) + "\n")
    receipt = json.loads(run("prove", "--db", str(log), "--id", "42").output)
    (tmp_path / "receipt.json").write_text(json.dumps(receipt))
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=30
    )
    assert ran.returncode == 0, ran.stderr
    assert (
        ran.stdout.strip()
        == f"entry 42 (entry_hash {receipt['entry_hash']}) is in {ORIGIN} at size {ENTRIES}"
    )
    for what, text, _ in tamper_cases(receipt, log)[3:]:
        (tmp_path / "receipt.json").write_text(text)
        ran = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=30
        )
        assert ran.returncode != 0, what
