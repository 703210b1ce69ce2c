"""`topic-audit explore` as a real process, over raw HTTP: only allowed Host names reach Datasette (DNS
rebinding), and no SQL can reach fts3_tokenizer() (a raw pointer with Debian's SQLite)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import listening_port, run_cli

SECRET_SQL = "select count(*) as entries from audit_log"


class Explore:
    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process, self.port = process, port

    def get(self, path: str, host: str | None) -> tuple[int, str]:
        """``GET path`` over a raw HTTP/1.1 connection with exactly this ``Host`` header (none if None)."""
        head = f"GET {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "")
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as conn:
            conn.sendall(f"{head}Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" in head.lower():
            body = dechunk(body)
        return int(head.split()[1]), body.decode("utf-8", "replace")


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size, _, data = data.partition(b"\r\n")
        if int(size, 16) == 0:
            return out
        out, data = out + data[: int(size, 16)], data[int(size, 16) + 2 :]


def start_explore(db: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> Explore:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "topic_audit.cli", "explore", "--db", str(db), "--port", "0", *args],
            stdout=out,
            stderr=out,
            env={**os.environ, **(env or {})},
        )
    return Explore(process, listening_port(process, log))


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "audit.db"
    assert run_cli("migrate", "--db", str(path)).returncode == 0
    return path


@pytest.fixture
def explore(db: Path, tmp_path: Path) -> Iterator[Explore]:
    running = start_explore(db, tmp_path / "explore.log")
    try:
        yield running
    finally:
        stop(running.process)


def sql(query: str) -> str:
    return f"/audit.json?sql={quote(query)}&_shape=array"


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:{port}", "127.0.0.1", "127.0.0.1:{port}", "[::1]", "[::1]:{port}", "LocalHost"],
)
def test_loopback_names_are_answered(explore: Explore, host: str) -> None:
    status, body = explore.get(sql(SECRET_SQL), host.format(port=explore.port))
    assert status == 200 and json.loads(body) == [{"entries": 0}]


@pytest.mark.parametrize(
    "host",
    [
        "attacker.example:{port}",  # DNS rebinding: the attacker's name, resolved to 127.0.0.1
        "attacker.example",
        "127.0.0.1.nip.io:{port}",
        "localhost.attacker.example",
        "localhost:{port}@attacker.example",
        "[::1]x",
        "",
        None,  # no Host at all
    ],
)
def test_any_other_host_is_refused_before_datasette(explore: Explore, host: str | None) -> None:
    status, body = explore.get(sql(SECRET_SQL), None if host is None else host.format(port=explore.port))
    assert status == 400
    assert "entries" not in body
    assert explore.get("/-/versions.json", "attacker.example")[0] == 400


def test_configured_names_replace_the_loopback_ones(db: Path, tmp_path: Path) -> None:
    running = start_explore(
        db, tmp_path / "explore.log", env={"TOPIC_AUDIT_EXPLORE_ALLOWED_HOSTS": "audit.internal  audit2:8443"}
    )
    try:
        assert running.get(sql(SECRET_SQL), "audit.internal:8001")[0] == 200
        assert running.get(sql(SECRET_SQL), "audit2:8443")[0] == 200
        assert running.get(sql(SECRET_SQL), "audit2:8444")[0] == 400  # name:port allows that port only
        assert running.get(sql(SECRET_SQL), "localhost")[0] == 400
    finally:
        stop(running.process)


def test_off_loopback_the_names_must_be_listed(db: Path) -> None:
    env = {"TOPIC_AUDIT_API_TOKEN": "a-token-for-grafana"}  # so that only the Host rule is missing
    try:
        refused = run_cli("explore", "--db", str(db), "--host", "0.0.0.0", "--port", "0", env=env, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("explore served on 0.0.0.0 without any allowed Host name")
    assert refused.returncode == 2
    assert "TOPIC_AUDIT_EXPLORE_ALLOWED_HOSTS" in refused.stderr


@pytest.mark.parametrize(
    "query",
    [
        "select hex(fts3_tokenizer('simple')) as leak",
        "select hex(fts3_tokenizer('porter')) as leak",
        "select fts3_tokenizer('simple', x'4141414141414141') as leak",
        "select quote(fts3_tokenizer('unicode61')) as leak",
    ],
)
def test_fts3_tokenizer_gives_no_pointer(explore: Explore, query: str) -> None:
    status, body = explore.get(sql(query), "localhost")
    answer = json.loads(body)
    assert status == 400 and answer["ok"] is False, body
    assert answer["error"] and not answer.get("rows")


def test_datasette_still_works(explore: Explore) -> None:
    assert explore.get("/audit/audit_log.json?_size=1&_facet=outcome", "localhost")[0] == 200
    assert explore.get("/audit/topics.json?_search=topic", "localhost")[0] == 200
    assert explore.get("/-/dashboards/callbacks", "localhost")[0] == 200
    status, body = explore.get(
        sql("select name from sqlite_master where type = 'table' limit 1"), "localhost"
    )
    assert status == 200 and json.loads(body)
