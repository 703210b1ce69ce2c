"""The real ``topic-audit serve`` process: concurrency, restarts, secrets, and the ``send`` command."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import APP_ID, TOKEN, Server, deliver_concurrently, metric_in, rows, run_cli, topics, wait_for
from topic_audit.tencent import samples

pytestmark = pytest.mark.slow  # real serve processes (make test-fast leaves them out)


def test_200_concurrent_deliveries(server: Server) -> None:
    responses = deliver_concurrently(server.url, 200, "conc")
    assert [r.status_code for r in responses] == [200] * 200
    assert all(r.json() == {"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0} for r in responses)
    logged = rows(server.db)
    assert [r["id"] for r in logged] == list(range(1, 201))
    assert {r["outcome"] for r in logged} == {"accepted"}
    assert len(topics(server.db)) == 200
    result = run_cli("verify", "--db", str(server.db), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["entries"] == 200


def test_a_restart_continues_the_chain(db_path: Path, tmp_path: Path) -> None:
    for round_ in range(2):
        running = Server(db_path, tmp_path / "server.log").start()
        try:
            assert all(r.status_code == 200 for r in deliver_concurrently(running.url, 20, f"r{round_}"))
        finally:
            running.stop()
    logged = rows(db_path)
    assert [r["id"] for r in logged] == list(range(1, 41))
    assert logged[20]["prev_hash"] == logged[19]["entry_hash"]
    assert run_cli("verify", "--db", str(db_path)).returncode == 0


def test_verify_finds_a_forged_row(server: Server) -> None:
    deliver_concurrently(server.url, 5, "v")
    server.stop()
    conn = sqlite3.connect(server.db)
    conn.execute("DROP TRIGGER audit_log_no_update")
    conn.execute("UPDATE audit_log SET client_ip = '10.0.0.1' WHERE id = 3")
    conn.commit()
    conn.close()
    result = run_cli("verify", "--db", str(server.db))
    assert result.returncode == 1
    # client_ip is content: the entry's keyed commitment stands for it
    assert "FAIL content: entry 3" in result.stdout


def test_the_token_appears_nowhere(server: Server) -> None:
    deliver_concurrently(server.url, 10, "secret")
    bad = samples.query(APP_ID, "Group.CallbackAfterCreateTopic", "wrong-token")
    answers = [
        httpx.post(f"{server.url}/callback?{bad}", json=samples.sample("after-create")).text,
        httpx.post(f"{server.url}/callback?SdkAppid={APP_ID}", content=b"{").text,
        httpx.get(f"{server.url}/metrics").text,
        httpx.get(f"{server.url}/readyz").text,
    ]
    server.stop()
    token = TOKEN.encode()
    for path in server.db.parent.iterdir():  # the database, its WAL, and the server log
        assert token not in path.read_bytes(), path
    for answer in answers:
        assert TOKEN not in answer


def test_credentials_in_headers_are_redacted(server: Server) -> None:
    body = samples.sample("after-create")
    query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
    headers = {"Authorization": "Bearer very-secret", "Cookie": "session=very-secret", "X-Trace": "kept"}
    assert httpx.post(f"{server.url}/callback?{query}", json=body, headers=headers).status_code == 200
    [row] = rows(server.db)
    stored = json.loads(row["request_headers"])
    assert stored["authorization"] == "[redacted]" and stored["cookie"] == "[redacted]"
    assert stored["x-trace"] == "kept"
    assert "very-secret" not in json.dumps(row, default=str)


def test_send_posts_the_signed_lifecycle(server: Server) -> None:
    env = {"TOPIC_AUDIT_SDKAPPID": APP_ID, "TOPIC_AUDIT_TOKEN": TOKEN}
    result = run_cli("send", "--url", f"{server.url}/callback", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("200 ") for line in lines)
    assert [r["outcome"] for r in rows(server.db)] == ["ignored", "accepted", "accepted", "accepted"]
    [topic] = topics(server.db).values()
    assert topic["deleted_entry_id"] == 4 and topic["notification"] == "NewNotification"


def test_send_a_file_from_stdin(server: Server) -> None:
    env = {"TOPIC_AUDIT_SDKAPPID": APP_ID, "TOPIC_AUDIT_TOKEN": TOKEN}
    body = json.dumps(samples.sample("group-created"))
    result = subprocess.run(
        [sys.executable, "-m", "topic_audit.cli", "send", "--url", f"{server.url}/callback", "--file", "-"],
        input=body,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert rows(server.db)[0]["callback_command"] == "Group.CallbackAfterCreateGroup"


def test_send_exits_non_zero_when_rejected(server: Server) -> None:
    env = {"TOPIC_AUDIT_SDKAPPID": "999", "TOPIC_AUDIT_TOKEN": TOKEN}
    result = run_cli("send", "--url", f"{server.url}/callback", "--sample", "after-create", env=env)
    assert result.returncode == 1
    assert result.stdout.startswith("403 ")


def test_serve_requires_an_app_id(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPIC_AUDIT_")}
    result = subprocess.run(
        [sys.executable, "-m", "topic_audit.cli", "serve", "--db", str(tmp_path / "x.db")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 2
    assert "TOPIC_AUDIT_SDKAPPID" in result.stderr


def test_serve_signs_checkpoints_while_idle_and_at_shutdown(db_path: Path, tmp_path: Path) -> None:
    import stat

    from topic_audit.settings import Settings
    from topic_audit.transparency import checkpoints

    running = Server(db_path, tmp_path / "server.log", env={"TOPIC_AUDIT_CHECKPOINT_SECONDS": "1"}).start()
    file = db_path.with_name("audit.db.checkpoints.jsonl")
    try:
        deliver_concurrently(running.url, 5, "cp")
        # Idle: checkpoints keep coming.
        wait_for(lambda: len(checkpoints.read_file(file)) >= 3, 10, "three checkpoints", interval=0.2)
    finally:
        running.stop()
    lines = checkpoints.read_file(file)
    assert len(lines) >= 3
    assert lines[-1]["log_size"] == 5  # the last one, at shutdown, covers everything answered
    key = Settings(db=db_path).signing_key_path
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "created checkpoint signing key" in (tmp_path / "server.log").read_text()
    pem = run_cli("public-key", "--db", str(db_path))
    assert pem.returncode == 0 and pem.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    (tmp_path / "pub.pem").write_text(pem.stdout)
    result = run_cli("verify", "--db", str(db_path), "--public-key", str(tmp_path / "pub.pem"), "--json")
    assert result.returncode == 0, result.stdout
    other = run_cli("verify", "--db", str(db_path), "--public-key", "ab" * 32, "--json")
    assert other.returncode == 1 and json.loads(other.stdout)["findings"][0]["check"] == "checkpoint_key"


def test_checkpoint_command(server: Server) -> None:
    deliver_concurrently(server.url, 3, "cmd")
    result = run_cli("checkpoint", "--db", str(server.db))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("checkpoint: 3 entries")


def test_send_load_mode_delivers_the_mix(server: Server) -> None:
    env = {"TOPIC_AUDIT_SDKAPPID": APP_ID, "TOPIC_AUDIT_TOKEN": TOKEN}
    result = run_cli(
        "send",
        "--url",
        f"{server.url}/callback",
        "--rate",
        "100",
        "--duration",
        "2",
        "--concurrency",
        "4",
        "--mix",
        "good=6,duplicate=2,bad=2",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    logged = rows(server.db)
    outcomes = {r["outcome"] for r in logged}
    assert {"accepted", "duplicate", "rejected"} <= outcomes
    assert 150 <= len(logged) <= 210  # ~200 at 100/s for 2 s
    assert f"sent {len(logged)} " in result.stdout
    rejected = {r["reason"] for r in logged if r["outcome"] == "rejected"}
    assert rejected == {"signature_invalid", "malformed_json", "app_id_mismatch", "invalid_payload"}


def test_two_serve_processes_on_one_file_keep_one_chain(db_path: Path, tmp_path: Path) -> None:
    first = Server(db_path, tmp_path / "one.log").start()
    second = Server(db_path, tmp_path / "two.log").start()
    try:

        async def both() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=64)) as client:

                async def one(url: str, n: int) -> httpx.Response:
                    body = samples.sample("after-create", TopicId=f"two-{n}")
                    return await client.post(
                        f"{url}/callback?{samples.query(APP_ID, body['CallbackCommand'], TOKEN)}", json=body
                    )

                return await asyncio.gather(*(one((first.url, second.url)[n % 2], n) for n in range(200)))

        responses = asyncio.run(both())
    finally:
        first.stop()
        second.stop()
    assert [r.status_code for r in responses] == [200] * 200
    assert [r["id"] for r in rows(db_path)] == list(range(1, 201))
    assert len(topics(db_path)) == 200
    assert run_cli("verify", "--db", str(db_path)).returncode == 0


@pytest.mark.parametrize(("workers", "server"), [("2", "uvicorn"), ("1", "granian"), ("2", "granian")])
def test_serving_from_worker_processes(db_path: Path, tmp_path: Path, workers: str, server: str) -> None:
    """Every worker appends to one chain, and /metrics (from any worker) counts what all of them did."""
    env = {
        "TOPIC_AUDIT_WORKERS": workers,
        "TOPIC_AUDIT_SERVER": server,
        "TOPIC_AUDIT_CHECKPOINT_SECONDS": "1",
    }
    running = Server(db_path, tmp_path / "server.log", env=env).start()
    try:

        async def deliver() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=32)) as client:

                async def one(n: int) -> httpx.Response:
                    body = samples.sample("after-create", TopicId=f"worker-{n % 100}")  # 20 redeliveries
                    query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
                    return await client.post(f"{running.url}/callback?{query}", json=body)

                return await asyncio.gather(*(one(n) for n in range(120)))

        responses = asyncio.run(deliver())

        def counted(text: str) -> tuple[float, ...]:
            return (
                metric_in(text, "topic_audit_callbacks_total", outcome="accepted"),
                metric_in(text, "topic_audit_callbacks_total", outcome="duplicate"),
                metric_in(text, "topic_audit_topics", state="active"),
                metric_in(text, "topic_audit_log_entries"),
            )

        # Whichever worker answers a scrape reports everything (gauges catch up with the other workers'
        # appends within a checkpoint interval).
        def every_scrape_counts_all() -> bool:
            scraped = [counted(httpx.get(f"{running.url}/metrics").text) for _ in range(4)]
            return all(c == (100, 20, 100, 120) for c in scraped)

        wait_for(every_scrape_counts_all, 10, "every scrape to count all 120 callbacks", interval=0.2)
    finally:
        running.stop()
    assert [r.status_code for r in responses] == [200] * 120
    assert [r["id"] for r in rows(db_path)] == list(range(1, 121))
    assert len(topics(db_path)) == 100
    result = run_cli("verify", "--db", str(db_path), "--json")
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["ok"]
