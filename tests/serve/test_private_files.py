"""A local user without the service's rights reads nothing: the data folder is 0700 and every file in it
0600 whatever the umask, the signing key lives outside the data folder, and a key others may read is
refused. Real processes (`migrate`, `serve` answering a callback, `checkpoint`) under umask 022."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import APP_ID, TOKEN, Server, deliver_concurrently, run_cli, wait_for
from topic_audit.settings import Settings
from topic_audit.transparency import checkpoints
from topic_audit.transparency.checkpoints import Signer


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    """The usual login umask: files 0644 and folders 0755 unless the program says otherwise (the
    processes started here inherit it)."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def modes(folder: Path) -> dict[str, int]:
    """The mode of ``folder`` and of everything under it, by path relative to it."""
    found = {".": mode(folder)}
    for path in folder.rglob("*"):
        try:
            found[str(path.relative_to(folder))] = mode(path)
        except FileNotFoundError:  # a -shm or lock gone meanwhile
            continue
    return found


def open_to_others(found: dict[str, int]) -> dict[str, str]:
    return {name: f"{m:04o}" for name, m in found.items() if m & 0o077}


def test_migrate_serve_and_checkpoint_leave_nothing_others_can_read(tmp_path: Path) -> None:
    data = tmp_path / "data"
    db = data / "audit.db"
    migrated = run_cli("migrate", "--db", str(db))
    assert migrated.returncode == 0, migrated.stderr
    assert mode(data) == 0o700 and mode(db) == 0o600
    running = Server(db, tmp_path / "server.log", env={"TOPIC_AUDIT_CHECKPOINT_SECONDS": "1"}).start()
    try:
        answers = deliver_concurrently(running.url, 3, "private")
        assert all(a.status_code == 200 for a in answers)
        checkpoint_file = Settings(db=db).checkpoint_path
        wait_for(lambda: len(checkpoints.read_file(checkpoint_file)) >= 1, 10, "a checkpoint", interval=0.2)
        serving = modes(data)  # the -wal, -shm and locks exist now
    finally:
        running.stop()
    assert {"audit.db-wal", "audit.db-shm", "audit.db.checkpoints.jsonl"} <= set(serving)
    assert open_to_others(serving) == {}
    signed = run_cli("checkpoint", "--db", str(db))
    assert signed.returncode == 0, signed.stderr
    assert open_to_others(modes(data)) == {}
    assert mode(data) == 0o700
    key = Settings(db=db).signing_key_path
    assert key.exists() and data not in key.parents  # outside the data folder
    assert mode(key) == 0o600 and mode(key.parent) == 0o700


def test_an_existing_deployment_is_tightened_at_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    db = data / "audit.db"
    sqlite3.connect(db).execute("PRAGMA journal_mode=WAL").close()
    Path(f"{db}.checkpoints.jsonl").write_text("")
    Path(f"{db}.retention.lock").write_text("")
    (data / "README.md").write_text("not the database's: left alone\n")
    for path in (db, Path(f"{db}.checkpoints.jsonl"), Path(f"{db}.retention.lock"), data / "README.md"):
        path.chmod(0o644)
    data.chmod(0o755)
    migrated = run_cli("migrate", "--db", str(db))
    assert migrated.returncode == 0, migrated.stderr
    assert mode(data) == 0o700
    assert mode(db) == mode(Path(f"{db}.checkpoints.jsonl")) == mode(Path(f"{db}.retention.lock")) == 0o600
    assert mode(data / "README.md") == 0o644
    assert "was open to other users" in migrated.stderr  # says what it changed


def test_the_default_signing_key_is_outside_the_data_folder_and_per_database(tmp_path: Path) -> None:
    one, other = Settings(db=tmp_path / "data" / "a.db"), Settings(db=tmp_path / "data" / "b.db")
    assert one.signing_key_path.parent == other.signing_key_path.parent == tmp_path / "data-keys"
    assert one.signing_key_path != other.signing_key_path
    assert Settings(db=Path("data/audit.db")).signing_key_path == Path("data-keys/audit.db.signing.key")


def test_a_key_at_the_old_default_keeps_signing_with_a_warning(tmp_path: Path) -> None:
    db = tmp_path / "data" / "audit.db"
    assert run_cli("migrate", "--db", str(db)).returncode == 0
    legacy, _ = Signer.load_or_create(db.with_name("checkpoint-signing.key"))
    signed = run_cli("checkpoint", "--db", str(db))
    assert signed.returncode == 0, signed.stderr
    assert "checkpoint-signing.key is beside the database" in signed.stderr
    assert "mv " in signed.stderr  # how to move it
    assert not Settings(db=db).signing_key_path.with_name("audit.db.signing.key").exists()  # no new key
    shown = run_cli("public-key", "--db", str(db), "--hex")
    assert shown.stdout.strip() == legacy.public_key_hex


def _serve(db: Path, log: Path, seconds: float = 20) -> tuple[int, str]:
    """``topic-audit serve`` as a process: its exit code once it ends by itself (or -1, stopped after
    ``seconds``), and what it wrote."""
    env = {
        **os.environ,
        "TOPIC_AUDIT_SDKAPPID": APP_ID,
        "TOPIC_AUDIT_TOKEN": TOKEN,
        "TOPIC_AUDIT_DB": str(db),
        "TOPIC_AUDIT_PORT": "0",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "topic_audit.cli", "serve"], env=env, stdout=out, stderr=out
        )
    try:
        code = process.wait(seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # it served: stop it as systemd would
        process.wait(30)
        code = -1
    return code, log.read_text()


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o620, 0o604], ids=lambda m: f"{m:04o}")
def test_serve_and_checkpoint_refuse_a_key_others_can_read_or_write(tmp_path: Path, loose: int) -> None:
    db = tmp_path / "data" / "audit.db"
    assert run_cli("migrate", "--db", str(db)).returncode == 0
    key = Settings(db=db).signing_key_path
    Signer.load_or_create(key)
    key.chmod(loose)
    refused = run_cli("checkpoint", "--db", str(db))
    assert refused.returncode == 1
    assert f"refusing the signing key {key}" in refused.stderr and f"chmod 600 {key}" in refused.stderr
    assert "Traceback" not in refused.stderr
    code, output = _serve(db, tmp_path / "serve.log")
    assert code == 2, output
    assert f"refusing the signing key {key}" in output and "Traceback" not in output
    key.chmod(0o600)
    assert run_cli("checkpoint", "--db", str(db)).returncode == 0


@pytest.mark.parametrize(
    "content",
    [
        b"not a key\n",
        b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
        b"",
    ],
    ids=["text", "truncated", "empty"],
)
@pytest.mark.parametrize("command", ["checkpoint", "public-key"])
def test_a_signing_key_that_is_not_a_key_is_refused_in_one_line(
    tmp_path: Path, command: str, content: bytes
) -> None:
    db = tmp_path / "data" / "audit.db"
    assert run_cli("migrate", "--db", str(db)).returncode == 0
    key = Settings(db=db).signing_key_path
    key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key.write_bytes(content)
    key.chmod(0o600)
    refused = run_cli(command, "--db", str(db))
    assert refused.returncode == 1
    assert f"the signing key {key} cannot be read" in refused.stderr and "Traceback" not in refused.stderr
