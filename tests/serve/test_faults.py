"""Storage faults and slow clients against the real ``serve`` process: answers are 503 FAIL (never OK),
/readyz says not ready, the failure is counted and logged once per episode, and the service recovers by
itself when the fault clears, with the chain still contiguous."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import (
    APP_ID,
    TESTS,
    TOKEN,
    Server,
    deliver_concurrently,
    metric,
    require_tool,
    rows,
    run_cli,
    unavailable,
    wait_for,
)
from topic_audit.tencent import samples

pytestmark = pytest.mark.slow  # real serve processes (make test-fast leaves them out)


def assert_fault_episode(server: Server, inject: Callable[[], None], clear: Callable[[], None]) -> None:
    """Deliver before, during and after a fault; check answers, readiness, metrics, log and chain."""
    assert all(r.status_code == 200 for r in deliver_concurrently(server.url, 5, "before"))
    inject()
    during = deliver_concurrently(server.url, 10, "during")
    assert {r.status_code for r in during} == {503}
    assert all(r.json()["ActionStatus"] == "FAIL" and r.json()["ErrorCode"] == 503 for r in during)
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503
    assert metric(server, "topic_audit_audit_append_errors_total") == 10
    clear()
    wait_for(lambda: httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200, 15, "recovery", 0.2)
    assert all(r.status_code == 200 for r in deliver_concurrently(server.url, 5, "after"))
    server.stop()
    log = server.log.read_text()
    assert log.count("audit log writes failing") == 1, log  # once per episode, not per request
    assert log.count("audit log writes recovered") == 1
    logged = rows(server.db)
    assert [r["id"] for r in logged] == list(range(1, 11))
    assert not any((r["topic_id"] or "").startswith("during") for r in logged)
    assert run_cli("verify", "--db", str(server.db)).returncode == 0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, so that the disk can really fill up (needs root and mount(8); skipped where mount is
    refused, unless TOPIC_AUDIT_REQUIRE_TOOLS=1)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(
        [require_tool("mount"), "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        unavailable(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full(tmpfs: Path, tmp_path: Path) -> None:
    server = Server(
        tmpfs / "audit.db", tmp_path / "server.log", env={"TOPIC_AUDIT_CHECKPOINT_SECONDS": "0"}
    ).start()
    filler = tmpfs / "filler"

    def fill() -> None:
        # First empty the WAL: frames it already holds are reused after a checkpoint without growing the
        # file, so a full disk would not show on the next commits (how many depends on what migrating wrote).
        conn = sqlite3.connect(tmpfs / "audit.db", timeout=5)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        with filler.open("wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass

    try:
        assert_fault_episode(server, fill, filler.unlink)
    finally:
        server.stop()


@pytest.fixture
def faultfs(tmp_path: Path) -> Path:
    """The EROFS fault library, compiled for this test (needs a C compiler)."""
    cc = shutil.which("cc") or require_tool("gcc")
    library = tmp_path / "faultfs.so"
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-o", str(library), str(TESTS / "faultfs.c"), "-ldl"], check=True
    )
    return library


def test_file_system_turns_read_only(faultfs: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    flag = tmp_path / "read-only-now"
    env = {
        "LD_PRELOAD": str(faultfs),
        "FAULT_FLAG": str(flag),
        "FAULT_DIR": str(data),
        "TOPIC_AUDIT_CHECKPOINT_SECONDS": "0",
    }
    server = Server(data / "audit.db", tmp_path / "server.log", env=env).start()
    try:
        assert_fault_episode(server, flag.touch, flag.unlink)
    finally:
        server.stop()


def test_locked_longer_than_the_busy_timeout(server: Server) -> None:
    other = sqlite3.connect(server.db, isolation_level=None)

    def lock() -> None:
        other.execute("BEGIN IMMEDIATE")

    def unlock() -> None:
        other.execute("ROLLBACK")

    try:
        assert_fault_episode(server, lock, unlock)
    finally:
        other.close()


def test_a_slow_client_is_answered_408_and_recorded(db_path: Path, tmp_path: Path) -> None:
    server = Server(db_path, tmp_path / "server.log", env={"TOPIC_AUDIT_BODY_TIMEOUT_SECONDS": "1"}).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                f"POST /callback?SdkAppid={APP_ID} HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n".encode()
                + b'{"CallbackCommand": '
            )
            started = time.monotonic()
            answer = ""
            while '"ErrorCode"' not in answer and (chunk := sock.recv(4096)):
                answer += chunk.decode()
        assert 0.9 < time.monotonic() - started < 5
        assert answer.startswith("HTTP/1.1 408") and '"ErrorCode":408' in answer
    finally:
        server.stop()
    [row] = rows(db_path)
    assert (row["status_code"], row["reason"]) == (408, "request_timeout")


def _serve_publicly(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``serve --host 0.0.0.0`` with only ``env`` of the TOPIC_AUDIT_ variables, expected to refuse."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOPIC_AUDIT_")}
    clean |= {"TOPIC_AUDIT_SDKAPPID": APP_ID, **env}
    args = ["serve", "--host", "0.0.0.0", "--port", "0", "--db", str(tmp_path / "refused.db")]
    try:
        return subprocess.run(
            [sys.executable, "-m", "topic_audit.cli", *args],
            capture_output=True,
            text=True,
            env=clean,
            timeout=20,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"serve started on a public address with {env}") from exc


@pytest.mark.parametrize("allow", [None, "0", "false"])
def test_serve_refuses_a_public_bind_without_a_token(tmp_path: Path, allow: str | None) -> None:
    env = {} if allow is None else {"TOPIC_AUDIT_ALLOW_UNAUTHENTICATED": allow}
    result = _serve_publicly(tmp_path, **env)
    assert result.returncode == 2 and "without callback authentication" in result.stderr, result.stderr
    assert not (tmp_path / "refused.db").exists()  # refused before anything was opened


@pytest.mark.parametrize(
    ("env", "unsigned"),
    [
        ({"TOPIC_AUDIT_ALLOW_UNAUTHENTICATED": "1", "TOPIC_AUDIT_TOKEN": ""}, 200),  # allowed, and open
        ({"TOPIC_AUDIT_ALLOW_UNAUTHENTICATED": "true", "TOPIC_AUDIT_TOKEN": ""}, 200),
        ({}, 401),  # a token: the public bind is allowed, and every callback must be signed
    ],
)
def test_a_public_bind_is_served_with_a_token_or_when_allowed(
    tmp_path: Path, env: dict[str, str], unsigned: int
) -> None:
    server = Server(tmp_path / "audit.db", tmp_path / "server.log", {"TOPIC_AUDIT_HOST": "0.0.0.0", **env})
    server.start()  # reached on loopback, which 0.0.0.0 includes
    try:
        body = samples.sample("after-create")
        answer = httpx.post(f"{server.url}/callback?SdkAppid={APP_ID}", json=body, timeout=10)
        signed = httpx.post(
            f"{server.url}/callback?{samples.query(APP_ID, body['CallbackCommand'], TOKEN)}",
            json=body,
            timeout=10,
        )
    finally:
        server.stop()
    assert answer.status_code == unsigned, answer.text
    assert signed.status_code == 200
    logged = server.log.read_text()
    assert ("NO callback authentication" in logged) == (unsigned == 200), logged
