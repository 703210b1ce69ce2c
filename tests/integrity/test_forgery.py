"""Someone with write access to the database but not the signing key: a forged erasure that hides an
edit to signed evidence is found by ``verify``, and never signed by ``checkpoint`` or ``serve``."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import APP_ID, ROOT, TOKEN, Post, run_cli
from litestar.testing import TestClient
from topic_audit.log import content
from topic_audit.metrics import Metrics
from topic_audit.privacy import records
from topic_audit.receiver.app import create_app
from topic_audit.settings import Settings
from topic_audit.tencent import samples
from topic_audit.transparency import checkpoints
from topic_audit.transparency.checkpoints import Signer, record_key
from topic_audit.writer import signer

CREATE = "after-create"
VICTIM = 6
"""The entry whose evidence the forgery changes (from accepted to rejected)."""


def forge(db: Path, victim: int = VICTIM, digest: str = "00" * 64) -> None:
    """The review's forgery, step by step: past the triggers, blank ``victim``, drop its commitment,
    change its evidence, delete its salt, append an erasure record that covers it (computed as our
    own code computes one, but without the key), then put the triggers back."""
    conn = sqlite3.connect(db)
    triggers = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
    for name, _ in triggers:
        conn.execute(f"DROP TRIGGER {name}")
    blank = ", ".join(f"{c} = ?" for c in content.CONTENT)
    conn.execute(
        f"UPDATE audit_log SET {blank}, content_commitment = NULL, outcome = 'rejected', status_code = 401, "
        "received_at = '2026-01-01T00:00:00.000Z' WHERE id = ?",
        [*(content.ERASED[c] for c in content.CONTENT), victim],
    )
    conn.execute("DELETE FROM content_keys WHERE entry_id = ?", (victim,))
    records.insert_record(conn, [(victim, None)], "request", "routine", digest, "2026-12-06T00:00:00.000Z")
    conn.commit()
    for _, sql in triggers:
        conn.execute(sql)
    conn.commit()
    conn.close()


def signed_lines(settings: Settings) -> int:
    path = settings.checkpoint_path
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture
def signed_log(post: Post, settings: Settings) -> Path:
    """Ten accepted callbacks under a signed checkpoint."""
    for i in range(10):
        post(samples.sample(CREATE, TopicId=f"@TGS#_forgery-{i}"))
    done = run_cli("checkpoint", "--db", str(settings.db), "--signing-key", str(settings.signing_key_path))
    assert done.returncode == 0, done.stderr
    return settings.db


def public_key(settings: Settings) -> str:
    return Signer.load_or_create(settings.signing_key_path)[0].public_key_hex


def test_a_forged_erasure_hiding_an_edit_is_found_by_verify(signed_log: Path, settings: Settings) -> None:
    forge(signed_log)
    done = run_cli("verify", "--db", str(signed_log), "--public-key", public_key(settings), "--json")
    assert done.returncode == 1, done.stdout
    found = {f["check"]: f for f in json.loads(done.stdout)["findings"]}
    assert found["content"]["entry_id"] == VICTIM  # no commitment where every entry must have one
    assert "erasure_signature" in found  # and a record the log's key never signed


def test_the_signer_refuses_to_sign_a_forgery(signed_log: Path, settings: Settings) -> None:
    before = signed_lines(settings)
    forge(signed_log)
    done = run_cli("checkpoint", "--db", str(signed_log), "--signing-key", str(settings.signing_key_path))
    assert done.returncode == 1
    assert "refusing to sign" in done.stderr and "erasure" in done.stderr
    assert signed_lines(settings) == before
    conn = sqlite3.connect(signed_log)
    assert conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == before
    conn.close()


def test_a_genuine_erasure_is_signed_and_verifies(signed_log: Path, settings: Settings) -> None:
    erased = run_cli(
        "erase", "--db", str(signed_log), "--id", str(VICTIM), "--reason", "request", "--yes",
        "--signing-key", str(settings.signing_key_path),
    )  # fmt: skip
    assert erased.returncode == 0, erased.stderr
    conn = sqlite3.connect(signed_log)
    entry_hash, signature = conn.execute("SELECT entry_hash, signature FROM erasures").fetchone()
    conn.close()
    assert records.signature_ok(public_key(settings), entry_hash, signature)
    signed = run_cli("checkpoint", "--db", str(signed_log), "--signing-key", str(settings.signing_key_path))
    assert signed.returncode == 0, signed.stderr
    done = run_cli("verify", "--db", str(signed_log), "--public-key", public_key(settings))
    assert done.returncode == 0, done.stdout


def test_raising_a_signed_boundary_is_found(signed_log: Path, settings: Settings) -> None:
    """The boundaries are signed: raising ``commitments_from`` past the forged entry (to exempt it)
    contradicts the checkpoint that signed it."""
    forge(signed_log)
    conn = sqlite3.connect(signed_log)
    conn.execute("DROP TRIGGER log_facts_no_update")
    conn.execute(
        "UPDATE log_facts SET value = 1000 WHERE name IN ('commitments_from', 'signed_erasures_from')"
    )
    conn.commit()
    conn.close()
    done = run_cli("verify", "--db", str(signed_log), "--public-key", public_key(settings), "--json")
    assert done.returncode == 1
    assert "log_facts" in {f["check"] for f in json.loads(done.stdout)["findings"]}
    refused = run_cli("checkpoint", "--db", str(signed_log), "--signing-key", str(settings.signing_key_path))
    assert refused.returncode == 1 and "log_facts" in refused.stderr


def test_serve_answers_on_but_signs_nothing_after_a_forgery(db_path: Path) -> None:
    settings = Settings(sdk_app_id=APP_ID, token=TOKEN, db=db_path, checkpoint_seconds=1)
    key = record_key(settings.signing_key_path, create=True)
    assert key is not None
    with TestClient(create_app(settings, Metrics())) as client:
        post = _poster(client)
        for i in range(10):
            assert post(i).status_code == 200
        deadline = time.monotonic() + 10
        while signed_lines(settings) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        forge(db_path)
        time.sleep(1.2)  # any tick under way when the forgery landed has finished
        before = signed_lines(settings)
        for i in range(10, 13):
            answered = post(i)
            assert answered.status_code == 200 and answered.json()["ActionStatus"] == "OK"
        time.sleep(2.5)  # two more ticks
        assert signed_lines(settings) == before


def _poster(client: TestClient[Any]) -> Any:
    def post(i: int) -> Any:
        body = samples.sample(CREATE, TopicId=f"@TGS#_serve-{i}")
        query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
        return client.post(f"/callback?{query}", content=json.dumps(body).encode())

    return post


def test_the_readme_scripts_catch_the_forgery(signed_log: Path, settings: Settings) -> None:
    """The auditor's own scripts (docs/log-format.md) find it too, without our code: the chain script sees
    an entry that lost its commitment, the checkpoint script a record the pinned key never signed."""
    readme = (ROOT / "docs" / "log-format.md").read_text()
    scripts = {
        section: readme.split(section, 1)[1]
        .split("```python", 1)[1]
        .split("```", 1)[0]
        .replace('"file:audit.db', f'"file:{signed_log}')
        for section in ("\n## Canonical form and re-verification\n", "\n## Signed checkpoints\n")
    }
    (signed_log.parent / "checkpoint-public-key.hex").write_text(public_key(settings))
    for script in scripts.values():  # the genuine log passes both
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, cwd=signed_log.parent
        )
        assert done.returncode == 0, done.stderr
    forge(signed_log)
    chain_check, checkpoint_check = (
        subprocess.run([sys.executable, "-c", s], capture_output=True, text=True, cwd=signed_log.parent)
        for s in scripts.values()
    )
    assert chain_check.returncode != 0 and f"entry {VICTIM} lost its content commitment" in chain_check.stderr
    assert checkpoint_check.returncode != 0 and "InvalidSignature" in checkpoint_check.stderr


def test_a_forgery_under_a_running_serve_stops_signing_and_alerts(tmp_path: Path) -> None:
    """A real ``serve`` (its supervisor signs every second): after the forgery it answers on, signs
    nothing more, says why in its log, and "Checkpoints not signed" fires in a real Prometheus."""
    from conftest import Prometheus, Server, require_tool, wait_for
    from grafana_files import alert_rules, evaluate

    binary = require_tool("prometheus")
    db = tmp_path / "audit.db"
    server = Server(db, tmp_path / "server.log", {"TOPIC_AUDIT_CHECKPOINT_SECONDS": "1"}).start()
    prometheus = Prometheus(binary, f"127.0.0.1:{server.port}", tmp_path)
    rule = next(r for r in alert_rules() if r["uid"] == "topic-audit-checkpoints-not-signed")
    settings = Settings(db=db)

    def send(i: int) -> httpx.Response:
        body = samples.sample(CREATE, TopicId=f"@TGS#_live-{i}")
        query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
        return httpx.post(f"{server.url}/callback?{query}", content=json.dumps(body).encode(), timeout=5)

    try:
        for i in range(10):
            assert send(i).status_code == 200
        wait_for(lambda: signed_lines(settings) >= 2, 20, "checkpoints")
        assert not evaluate(rule, prometheus.query)
        forge(db)
        started = time.monotonic()
        wait_for(lambda: "refusing to sign a checkpoint" in server.log.read_text(), 20, "the refusal")
        before = signed_lines(settings)
        for i in range(10, 20):
            answered = send(i)
            assert answered.status_code == 200 and answered.json()["ActionStatus"] == "OK"
        wait_for(lambda: evaluate(rule, prometheus.query), 30, "Checkpoints not signed to fire")
        fired = time.monotonic() - started
        assert signed_lines(settings) == before
    finally:
        prometheus.stop()
        server.stop()
    assert signed_lines(settings) == before  # not even the last one, at shutdown
    print(f"\nCheckpoints not signed fired {fired:.1f} s after the forgery")


def _checkpoint(settings: Settings) -> subprocess.CompletedProcess[str]:
    return run_cli("checkpoint", "--db", str(settings.db), "--signing-key", str(settings.signing_key_path))


def test_raised_boundaries_are_found_before_any_checkpoint_signs_them(post: Post, settings: Settings) -> None:
    """Between the upgrade that fixes the boundaries and the first checkpoint that signs them, raising
    them is still found: no entry below commitments_from may carry a commitment."""
    for i in range(10):
        post(samples.sample(CREATE, TopicId=f"@TGS#_window-{i}"))
    conn = sqlite3.connect(settings.db)
    kept = conn.execute(
        "SELECT sql FROM sqlite_master WHERE tbl_name = 'log_facts' AND sql IS NOT NULL"
    ).fetchall()
    facts = conn.execute("SELECT name, value FROM log_facts").fetchall()
    conn.execute("DROP TABLE log_facts")  # the log as the version before signed its checkpoints
    conn.commit()
    signer = Signer.load_or_create(settings.signing_key_path)[0]
    checkpoints.make_checkpoint(conn, signer, settings.checkpoint_path, "2026-12-06T00:00:00.000Z")
    for (sql,) in kept:  # then the upgrade: the boundaries fixed, not yet signed
        conn.execute(sql)
    conn.executemany("INSERT INTO log_facts (name, value) VALUES (?, ?)", facts)
    conn.commit()
    conn.close()
    assert "commitments_from" not in signed_line(settings)
    forge(settings.db)
    conn = sqlite3.connect(settings.db)
    conn.execute("DROP TRIGGER log_facts_no_update")
    conn.execute("UPDATE log_facts SET value = 1000000")
    conn.commit()
    conn.close()
    refused = _checkpoint(settings)
    assert refused.returncode == 1 and "log_facts" in refused.stderr, refused.stderr
    done = run_cli("verify", "--db", str(settings.db), "--public-key", public_key(settings), "--json")
    assert done.returncode == 1 and "log_facts" in {f["check"] for f in json.loads(done.stdout)["findings"]}


def signed_line(settings: Settings) -> dict[str, Any]:
    last: dict[str, Any] = json.loads(settings.checkpoint_path.read_text().splitlines()[-1])
    return last


def test_a_removed_checkpoint_history_is_not_restarted_over_a_forgery(
    signed_log: Path, settings: Settings
) -> None:
    settings.checkpoint_path.unlink()
    conn = sqlite3.connect(signed_log)
    conn.execute("DROP TRIGGER IF EXISTS checkpoints_no_delete")
    conn.execute("DELETE FROM checkpoints")
    conn.commit()
    conn.close()
    forge(signed_log)
    conn = sqlite3.connect(signed_log)
    conn.execute("DROP TRIGGER log_facts_no_update")
    conn.execute("UPDATE log_facts SET value = 1000000")  # and the boundaries raised past it
    conn.commit()
    conn.close()
    refused = _checkpoint(settings)  # vetted from scratch: the raised boundaries do not fit the log
    assert refused.returncode == 1 and "log_facts" in refused.stderr, refused.stderr
    assert not settings.checkpoint_path.exists()


def test_a_log_with_a_stored_tree_and_no_checkpoints_is_not_signed_afresh(
    post: Post, settings: Settings
) -> None:
    """Only signing stores the tree: a log that has one but no checkpoint file lost its history."""
    for i in range(300):
        post(samples.sample(CREATE, TopicId=f"@TGS#_history-{i}"))
    assert _checkpoint(settings).returncode == 0
    settings.checkpoint_path.unlink()
    conn = sqlite3.connect(settings.db)
    conn.execute("DROP TRIGGER IF EXISTS checkpoints_no_delete")
    conn.execute("DELETE FROM checkpoints")
    conn.commit()
    conn.close()
    refused = _checkpoint(settings)
    assert refused.returncode == 1 and "restore the checkpoint file" in refused.stderr, refused.stderr


def test_a_half_written_last_line_is_dropped_and_signing_goes_on(
    signed_log: Path, settings: Settings
) -> None:
    text = settings.checkpoint_path.read_bytes()
    settings.checkpoint_path.write_bytes(text + text[:40])  # a crash while appending the next line
    done = _checkpoint(settings)
    assert done.returncode == 0, done.stderr
    assert len(settings.checkpoint_path.read_text().splitlines()) == 2


def test_the_boundaries_are_checked_again_under_the_lock(signed_log: Path, settings: Settings) -> None:
    """What changes between the signer's two passes is caught by the second."""
    conn = sqlite3.connect(signed_log)
    vetting = signer.Vetting(public_key(settings), signer.last_signed(conn, settings.checkpoint_path))
    assert vetting.advance(conn) == []
    conn.execute("DROP TRIGGER log_facts_no_update")
    conn.execute("UPDATE log_facts SET value = value + 1 WHERE name = 'signed_erasures_from'")
    conn.commit()
    assert "log_facts" in {f.check for f in vetting.advance(conn)}
    conn.close()


def test_the_tree_is_extended_window_by_window_to_the_same_root(
    signed_log: Path, settings: Settings, post: Post, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signer reads the leaves since the last checkpoint a window at a time (its memory stays flat
    however much a checkpoint covers); the windows, here 4 leaves from an unaligned size of 10, give the
    root the stored tree gives."""
    from topic_audit.transparency import tree

    for i in range(29):
        post(samples.sample(CREATE, TopicId=f"@TGS#_window-{i}"))
    monkeypatch.setattr(signer, "LEAVES_AT_ONCE", 4)
    conn = sqlite3.connect(signed_log)
    tree.update(conn)
    vetting = signer.Vetting(public_key(settings), signer.last_signed(conn, settings.checkpoint_path))
    assert vetting.advance(conn) == []
    assert vetting.frontier is not None and vetting.frontier.size == 39
    assert vetting.frontier.root() == tree.root(conn, 39)
    conn.close()
    assert _checkpoint(settings).returncode == 0


def test_a_rewritten_signed_record_is_not_signed_again(signed_log: Path, settings: Settings) -> None:
    erased = run_cli(
        "erase", "--db", str(signed_log), "--id", "3", "--reason", "request", "--yes",
        "--signing-key", str(settings.signing_key_path),
    )  # fmt: skip
    assert erased.returncode == 0, erased.stderr
    assert _checkpoint(settings).returncode == 0
    conn = sqlite3.connect(signed_log)
    conn.row_factory = sqlite3.Row
    record = dict(conn.execute("SELECT * FROM erasures WHERE id = 1").fetchone())
    record["reason"] = "nothing to see"
    conn.execute("DROP TRIGGER erasures_no_update")
    conn.execute(
        "UPDATE erasures SET reason = ?, entry_hash = ? WHERE id = 1",
        (record["reason"], records.record_hash(record)),
    )
    conn.commit()
    conn.close()
    refused = _checkpoint(settings)
    assert refused.returncode == 1 and "checkpoint_erasures" in refused.stderr, refused.stderr


def test_retain_without_the_key_writes_no_record(signed_log: Path, settings: Settings) -> None:
    """An unsigned record would stop every later checkpoint: retain refuses instead."""
    done = run_cli(
        "retain",
        "--db",
        str(signed_log),
        "--older-than",
        "0s",
        "--signing-key",
        str(signed_log.parent / "nokey"),
    )
    assert done.returncode == 1 and "does not exist" in done.stderr, done.stderr
    conn = sqlite3.connect(signed_log)
    assert conn.execute("SELECT count(*) FROM erasures").fetchone()[0] == 0
    conn.close()
