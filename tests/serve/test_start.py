"""How ``serve`` starts: its receivers beside its writer, and nothing loaded that answering does not need
(docs/performance.md, "Cold start"). Real ``serve`` processes on real SQLite files."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import APP_ID, TOKEN, Server, rows, send
from topic_audit.tencent import samples

pytestmark = pytest.mark.slow  # real serve processes (make test-fast leaves them out)

NOT_NEEDED = ("aiohttp", "datasette", "topic_audit.auditor", "topic_audit.forwarding.forwarder", "websockets")
"""What no process of a ``serve`` without forwarding loads: the forwarding client, the auditors' Datasette,
a WebSocket protocol."""


def imported(log: Path) -> set[str]:
    """Every module any process imported, from their ``PYTHONPROFILEIMPORTTIME`` lines in ``log``."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in log.read_text(errors="replace").splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def test_serve_without_forwarding_loads_neither_forwarding_nor_datasette(
    db_path: Path, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    running = Server(db_path, log, env={"PYTHONPROFILEIMPORTTIME": "1"}).start()
    try:
        assert send(running.url, samples.sample("after-create", TopicId="loaded")).status_code == 200
    finally:
        running.stop()
    modules = imported(log)  # after the stop: also what was loaded once the first answers went out
    assert {"litestar", "topic_audit.writer.committer"} <= modules  # the receiver's and the writer's lines
    loaded = sorted(m for m in modules if any(m == n or m.startswith(f"{n}.") for n in NOT_NEEDED))
    assert loaded == []
    assert [r["topic_id"] for r in rows(db_path)] == ["loaded"]


def _started_at(pid: int) -> float:
    """When process ``pid`` started, in ``time.time()`` terms (to a clock tick)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def test_the_receivers_start_beside_the_writer_not_after_it(db_path: Path, tmp_path: Path) -> None:
    """The first receiver is started before the writer process listens (it waits for the writer's socket),
    not once the writer has said it is ready: one interpreter's start less before the first answer."""
    running = Server(db_path, tmp_path / "serve.log").start()
    try:
        assert running.process is not None
        children = Path(f"/proc/{running.process.pid}/task/{running.process.pid}/children").read_text()
        started = {
            Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[2]: _started_at(int(pid))
            for pid in children.split()
        }
        sockets = list(
            Path(tempfile.gettempdir()).glob(f"topic-audit-writer-{running.process.pid}-*/writer-1.sock")
        )
        assert len(started) == 2 and len(sockets) == 1
        writer, receiver = (
            started[b"topic_audit.serve.writer_process"],
            started[b"topic_audit.serve.receiver_process"],
        )
        listening = sockets[0].stat().st_mtime
        assert receiver - writer < (listening - writer) / 2
        assert send(running.url, samples.sample("after-create", TopicId="beside")).status_code == 200
    finally:
        running.stop()
    assert [r["topic_id"] for r in rows(db_path)] == ["beside"]
    assert "waiting for the writer process" not in (tmp_path / "serve.log").read_text()  # it was starting


def _serve_until_it_stops(db: Path, log: Path, **env: str) -> tuple[int, str, float]:
    """``serve`` on ``db`` (with ``env`` added), expected to stop by itself: its exit code, what it said,
    and how long it took."""
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.run(
            [sys.executable, "-m", "topic_audit.cli", "serve"],
            env={
                **os.environ,
                "TOPIC_AUDIT_SDKAPPID": APP_ID,
                "TOPIC_AUDIT_TOKEN": TOKEN,
                "TOPIC_AUDIT_DB": str(db),
                "TOPIC_AUDIT_PORT": "0",
                **env,
            },
            stdout=out,
            stderr=out,
            timeout=60,
        )
    return process.returncode, log.read_text(), time.monotonic() - started


def test_serve_stops_at_once_when_it_cannot_migrate(tmp_path: Path) -> None:
    """A log with migrations to apply (here: a new one) is migrated by serve itself before any child
    starts: an upgrade's migrations may take longer than a receiver waits for the writer. When that fails
    (here: the database locked for longer than the busy timeout), serve says so and exits 1 at once."""
    db = tmp_path / "data" / "audit.db"
    db.parent.mkdir(mode=0o700)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        code, said, took = _serve_until_it_stops(db, tmp_path / "serve.log")
    finally:
        holder.close()
    assert code == 1
    assert "serve could not start" in said and "database is locked" in said
    assert "migrating" in said and "receiver process" not in said  # no child started
    assert took < 20, took  # the writer's busy timeout, not a receiver's wait for it (30 s) on top


def _environments_naming(text: str) -> list[int]:
    """The processes whose environment contains ``text``."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if text.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return found


def test_serve_stops_at_once_when_its_writer_cannot_start(tmp_path: Path) -> None:
    """The migrations done, the writer process fails at start (here: its signing key is not a key). The
    receivers started beside it, still waiting for it, are stopped with it: serve exits 1 at once, saying
    why in one line each, not after a receiver's 30 s wait for a writer that will not come."""
    db, key = tmp_path / "data" / "audit.db", tmp_path / "signing.key"
    key.write_text("not a key\n")
    key.chmod(0o600)
    code, said, took = _serve_until_it_stops(db, tmp_path / "serve.log", TOPIC_AUDIT_SIGNING_KEY=str(key))
    assert code == 1
    assert f"the writer process could not start: the signing key {key} cannot be read" in said
    assert "serve could not start: writer process" in said and "Traceback" not in said
    assert took < 20, took  # not a receiver's 30 s wait for the writer on top
    assert _environments_naming(str(db)) == []  # no receiver left waiting
    assert sqlite3.connect(db).execute("SELECT count(*) FROM audit_log").fetchone() == (0,)  # migrated
