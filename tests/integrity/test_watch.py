"""``topic-audit watch`` on a real log: intact, an old entry altered behind the triggers, a deleted tail, a
forged checkpoint, a rewritten checkpoint file, a rewritten chain; each reported within the stated number
of rounds (the cost of a round is measured in `make bench`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from benchmarks.logs import generate_log
from conftest import alter, free_port, listening_ports, start_on_free_ports
from topic_audit import clock
from topic_audit.integrity.watch import Watch
from topic_audit.transparency.checkpoints import Signer, make_checkpoint
from topic_audit.writer.thread import connect

ENTRIES, SWEEP = 3000, 500


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("watch") / "audit.db"
    generate_log(db, ENTRIES, seed=11)
    signer, _ = Signer.load_or_create(db.with_name("key.pem"))
    conn = connect(db)
    make_checkpoint(conn, signer, db.with_name("audit.db.checkpoints.jsonl"), clock.iso(0))
    conn.close()
    return db


@pytest.fixture
def copy(original: Path, tmp_path: Path) -> Path:
    db = tmp_path / "audit.db"
    shutil.copy(original, db)
    shutil.copy(original.with_name("audit.db.checkpoints.jsonl"), tmp_path / "audit.db.checkpoints.jsonl")
    return db


def watcher(db: Path) -> Watch:
    return Watch(db, db.with_name("audit.db.checkpoints.jsonl"), sweep_entries=SWEEP)


def rounds_until_found(watch: Watch, limit: int) -> int:
    for n in range(1, limit + 1):
        if watch.round().findings:
            return n
    raise AssertionError(f"nothing found in {limit} rounds")


def test_an_intact_log_has_no_findings_however_many_rounds(copy: Path) -> None:
    watch = watcher(copy)
    for _ in range(ENTRIES // SWEEP + 2):  # a whole sweep and more
        assert watch.round().findings == []
    assert watch.metrics.findings._value.get() == 0
    assert watch.metrics.verified._value.get() == ENTRIES


def test_an_old_entry_altered_behind_the_triggers_is_found_by_the_sweep(copy: Path) -> None:
    watch = watcher(copy)
    watch.round()  # everything verified once
    alter(copy, "UPDATE audit_log SET client_ip = '10.0.0.9' WHERE id = 2100")
    found = rounds_until_found(watch, ENTRIES // SWEEP + 1)
    assert found <= ENTRIES // SWEEP + 1  # the stated bound: entries ÷ sweep rounds
    assert {f.check for f in watch.findings.values()} == {"content"}  # client_ip: under the entry's salt
    assert watch.metrics.findings._value.get() == 1


def test_a_deleted_tail_is_found_in_the_next_round(copy: Path) -> None:
    watch = watcher(copy)
    watch.round()
    alter(copy, f"DELETE FROM audit_log WHERE id > {ENTRIES - 10}")
    assert rounds_until_found(watch, 1) == 1
    assert "entries removed" in next(iter(watch.findings.values())).message


def test_a_forged_checkpoint_is_found_in_the_next_round(copy: Path, tmp_path: Path) -> None:
    watch = watcher(copy)
    watch.round()
    forger, _ = Signer.load_or_create(tmp_path / "forger.pem")
    conn = connect(copy)
    make_checkpoint(conn, forger, copy.with_name("audit.db.checkpoints.jsonl"), clock.iso(1))  # another key
    conn.close()
    assert rounds_until_found(watch, 1) == 1
    assert {f.check for f in watch.findings.values()} == {"checkpoint_key"}


def test_a_rewritten_checkpoint_file_is_found_in_the_next_round(copy: Path) -> None:
    watch = watcher(copy)
    watch.round()
    file = copy.with_name("audit.db.checkpoints.jsonl")
    line = json.loads(file.read_text())
    line["log_size"] = 10
    file.write_text(json.dumps(line) + "\n")
    assert rounds_until_found(watch, 1) == 1
    assert any("rewritten" in f.message for f in watch.findings.values())


def test_a_chain_rewritten_from_the_verified_head_is_found_at_once(copy: Path) -> None:
    watch = watcher(copy)
    watch.round()
    # Another first digit: always a change ('f' alone left the one hash in 16 that starts with it intact).
    alter(
        copy,
        "UPDATE audit_log SET entry_hash = "
        "(CASE substr(entry_hash, 1, 1) WHEN 'f' THEN '0' ELSE 'f' END) || substr(entry_hash, 2) "
        f"WHERE id = {ENTRIES}",
    )
    assert rounds_until_found(watch, 1) == 1
    assert {f.check for f in watch.findings.values()} >= {"chain"}


def test_the_command_serves_its_metrics_and_exits_1_on_a_finding(copy: Path) -> None:
    log = copy.with_name("watch.log")

    def launch() -> tuple[subprocess.Popen[bytes], set[int]]:
        port = free_port()  # `watch --metrics-port 0` means no metrics: a free port, taken with a retry
        with log.open("ab") as out:
            command = ["watch", "--db", str(copy), "--interval", "0.2", "--metrics-port", str(port)]
            return subprocess.Popen(
                [sys.executable, "-m", "topic_audit.cli", *command, "--sweep-entries", str(SWEEP)],
                stdout=out,
                stderr=out,
            ), {port}

    process = start_on_free_ports(launch, log)
    port = listening_ports(process.pid).pop()
    try:
        deadline = time.monotonic() + 20
        text = ""
        while time.monotonic() < deadline:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
                if f"topic_audit_watch_verified_entries {ENTRIES}.0" in text:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert "topic_audit_watch_findings 0.0" in text, text
        assert "topic_audit_watch_last_success_timestamp_seconds" in text
        alter(copy, "UPDATE audit_log SET detail = 'edited' WHERE id = 7")
        deadline = time.monotonic() + 20
        while "topic_audit_watch_findings 1.0" not in text and time.monotonic() < deadline:
            time.sleep(0.2)
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
        assert "topic_audit_watch_findings 1.0" in text
    finally:
        process.terminate()
        process.wait(10)
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "topic_audit.cli",
            "watch",
            "--db",
            str(copy),
            "--rounds",
            "1",
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert one.returncode == 1 and "integrity finding content: entry 7" in one.stderr, one.stderr
