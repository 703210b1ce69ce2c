"""Bounded input at the receiver's edge: the request head (its bytes, its header fields, its deadline),
the recorded peer address, and credentials in headers. The server layer is tested as it runs: a real
``topic-audit serve`` and raw sockets, since uvicorn's protocol, not the app, sees a head as it arrives."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import APP_ID, TOKEN, Post, Server, metric, rows, run_cli
from litestar.testing import TestClient
from topic_audit.settings import Settings
from topic_audit.tencent import checks, models, samples

SUBJECT_IP = "198.51.100.77"
TRUNCATED_KEY = "[truncated]"  # topic_audit.receiver.app.TRUNCATED_KEY: what of the headers was not kept


def answer_of(response: httpx.Response, status: int, reason: str) -> None:
    """The contract's JSON answer of a rejection."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    answer = response.json()
    assert set(answer) == {"ActionStatus", "ErrorInfo", "ErrorCode"}
    assert (answer["ActionStatus"], answer["ErrorCode"]) == ("FAIL", status)
    assert answer["ErrorInfo"].startswith(reason)


# -- 9b: credentials in headers ---------------------------------------------------------------------


def test_credential_like_headers_are_redacted(post: Post, db_path: Path) -> None:
    secret = "s3cr3t-value-91d2"
    redacted = [
        "Authorization",
        "Proxy-Authorization",
        "Cookie",
        "X-Api-Key",
        "X-Auth-Token",
        "X-Access-Token",
        "X-Session-Id",
        "X-Client-Secret",
        "X-Password",
        "X-Signature",
        "X-Csrf-Token",
        "X-Amz-Credential",
    ]
    kept = {"X-Trace": "trace-1", "User-Agent": "tencent-im/1.0", "X-Forwarded-Proto": "https"}
    headers = {**{name: secret for name in redacted}, **kept}
    assert post(samples.sample("after-create"), headers=headers).status_code == 200
    [row] = rows(db_path)
    stored = json.loads(row["request_headers"])
    for name in redacted:
        assert stored[name.lower()] == "[redacted]", name
    for name, value in kept.items():
        assert stored[name.lower()] == value
    assert secret not in json.dumps(row, default=str)


# -- 4: header bytes and count, in the app (any server) ------------------------------------------------


@pytest.fixture
def bounded_client(tmp_path: Path) -> Any:
    from topic_audit.receiver.app import create_app

    settings = Settings(sdk_app_id=APP_ID, token=TOKEN, db=tmp_path / "audit.db", checkpoint_seconds=0)
    with TestClient(create_app(settings)) as client:
        yield client


def test_too_many_header_fields_are_answered_431_and_recorded_truncated(
    bounded_client: Any, tmp_path: Path
) -> None:
    body = samples.sample("after-create")
    query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
    headers = [(f"x-h{n}", "v") for n in range(150)]
    response = bounded_client.post(f"/callback?{query}", json=body, headers=headers)
    answer_of(response, 431, "headers_too_large")
    [row] = rows(tmp_path / "audit.db")
    assert (row["status_code"], row["outcome"], row["reason"]) == (431, "rejected", "headers_too_large")
    stored = json.loads(row["request_headers"])
    assert len(stored) == 101 and "x-h0" in stored and "x-h149" not in stored  # the first 100, and the note
    assert stored[TRUNCATED_KEY].startswith("truncated: kept 100 of 15")
    assert row["request_body_bytes"] == 0  # the body of a refused head is not read
    assert row["sdk_app_id"] == APP_ID  # what the head said is still evidence


def test_a_head_over_the_byte_limit_is_answered_431_and_recorded_bounded(
    bounded_client: Any, tmp_path: Path
) -> None:
    """No SdkAppid (a 403 before), and a 64 KiB header: the 431 comes first, and the row stays small."""
    response = bounded_client.post("/callback", content=b"{}", headers={"x-big": "a" * 65536})
    answer_of(response, 431, "headers_too_large")
    [row] = rows(tmp_path / "audit.db")
    assert row["reason"] == "headers_too_large"
    assert len(row["request_headers"]) < 16384 + 512
    stored = json.loads(row["request_headers"])
    assert TRUNCATED_KEY in stored and len(stored["x-big"]) < 16384


def test_the_head_checks_come_before_the_method(bounded_client: Any, tmp_path: Path) -> None:
    response = bounded_client.get("/callback", headers={"x-big": "a" * 20000})
    answer_of(response, 431, "headers_too_large")
    assert rows(tmp_path / "audit.db")[0]["method"] == "GET"


def test_head_rejections_are_counted_and_never_forwarded() -> None:
    from topic_audit import metrics

    assert {"header_timeout", "headers_too_large"} <= set(metrics.REASONS)
    settings = Settings(sdk_app_id=APP_ID, token=TOKEN)
    for changes, reason in (
        ({"head_timed_out": True}, "header_timeout"),
        ({"header_count": 101}, "headers_too_large"),
    ):
        request = checks.RawRequest(
            "POST", "/callback", samples.query(APP_ID, models.AFTER_CREATE, TOKEN), (), b"{}", **changes
        )  # type: ignore[arg-type]
        decision = checks.decide(request, settings, time.time())
        assert (decision.status_code, decision.reason, decision.authenticated) == (
            408 if reason == "header_timeout" else 431,
            reason,
            False,
        )


# -- 8: the recorded peer address ----------------------------------------------------------------------

PROXIES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")]


@pytest.mark.parametrize(
    ("peer", "forwarded", "proxies", "recorded"),
    [
        ("127.0.0.1", ["198.51.100.77"], [], "127.0.0.1"),  # no trusted proxy: the peer, always
        ("203.0.113.5", ["198.51.100.77"], PROXIES, "203.0.113.5"),  # not from a proxy
        ("127.0.0.1", ["198.51.100.77"], PROXIES, "198.51.100.77"),
        ("127.0.0.1", ["1.2.3.4, 198.51.100.77, 10.1.2.3"], PROXIES, "198.51.100.77"),  # right to left
        ("127.0.0.1", ["1.2.3.4", "198.51.100.77"], PROXIES, "198.51.100.77"),  # repeated header
        ("127.0.0.1", ["not-an-address, 10.1.2.3"], PROXIES, "10.1.2.3"),  # garbage stops the walk
        ("127.0.0.1", ["garbage"], PROXIES, "127.0.0.1"),
        ("127.0.0.1", ["198.51.100.77:4711"], PROXIES, "198.51.100.77"),
        ("127.0.0.1", ["[2001:db8::1]:443"], PROXIES, "2001:db8::1"),
        ("127.0.0.1", [], PROXIES, "127.0.0.1"),
    ],
)
def test_x_forwarded_for_is_read_only_from_trusted_proxies(
    peer: str, forwarded: list[str], proxies: list[Any], recorded: str
) -> None:
    assert checks.client_address(peer, forwarded, proxies) == recorded


def test_trusted_proxies_are_checked() -> None:
    from topic_audit.settings import SettingsError

    Settings(sdk_app_id=APP_ID, trusted_proxies=("10.0.0.0/8", "::1")).validate()
    with pytest.raises(SettingsError, match="TRUSTED_PROXIES"):
        Settings(sdk_app_id=APP_ID, trusted_proxies=("proxy.internal",)).validate()


# -- the real server: uvicorn's protocol and raw sockets -----------------------------------------------


def _serve(tmp_path: Path, **env: str) -> Server:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return Server(data / "audit.db", tmp_path / "server.log", env=env).start()


def _answer(sock: socket.socket) -> bytes:
    """What the server sends until it closes (or the socket times out)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pass
    except ConnectionResetError:
        pass
    return received


@pytest.mark.slow
def test_serve_refuses_a_4_mib_header_and_records_it_truncated(tmp_path: Path) -> None:
    server = _serve(tmp_path)
    try:
        head = (
            b"POST /callback HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
            + b"a" * (4 << 20)
            + b"\r\nContent-Length: 2\r\n\r\n{}"
        )
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            with contextlib.suppress(OSError):  # the server may close before all is sent; it answered first
                sock.sendall(head)
            answer = _answer(sock)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b'"ErrorCode":431' in answer and b"connection: close" in answer.lower()
        # the next connection is served as usual
        body = samples.sample("after-create")
        query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
        assert httpx.post(f"{server.url}/callback?{query}", json=body, timeout=5).status_code == 200
    finally:
        server.stop()
    refused, accepted = rows(server.db)
    assert (refused["status_code"], refused["reason"]) == (431, "headers_too_large")
    assert (refused["method"], refused["path"]) == ("POST", "/callback")
    assert len(refused["request_headers"]) < 16384 + 512, len(refused["request_headers"])
    assert TRUNCATED_KEY in json.loads(refused["request_headers"])
    assert accepted["outcome"] == "accepted"
    assert sum(f.stat().st_size for f in server.db.parent.iterdir()) < 2 << 20


@pytest.mark.slow
def test_serve_closes_slow_heads_answers_408_and_records_them(tmp_path: Path) -> None:
    server = _serve(tmp_path, TOPIC_AUDIT_HEADER_TIMEOUT_SECONDS="1")
    try:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=4) as silent:
            assert _answer(silent) == b""  # closed, nothing said: nothing of a request came
        assert time.monotonic() - started < 3, "a silent connection stayed open"

        head = f"POST /callback?SdkAppid={APP_ID}&CallbackCommand=x HTTP/1.1\r\nHost: a\r\nX-Slow: ".encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=4) as slow:
            started = time.monotonic()
            slow.sendall(head)
            answer = b""
            for _ in range(30):  # one byte every 0.2 s, never the end of the head
                try:
                    slow.sendall(b"z")
                except OSError:
                    break
                slow.settimeout(0.2)
                try:
                    answer += slow.recv(65536)
                except TimeoutError:
                    continue
                if answer:
                    break
            slow.settimeout(2)
            answer += _answer(slow)
            elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b'"ErrorInfo":"header_timeout' in answer
        assert elapsed < 3, elapsed

        # on a kept-alive connection, the next request's head has its own deadline
        body = samples.sample("after-create")
        query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
        payload = json.dumps(body).encode()
        request = (
            f"POST /callback?{query} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        with socket.create_connection(("127.0.0.1", server.port), timeout=4) as kept:
            kept.sendall(request)
            first = b""
            while not first.endswith(b"}"):  # the whole first answer (a JSON object)
                first += kept.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 "), first
            kept.sendall(b"POST /callback HTTP/1.1\r\nHo")
            second = _answer(kept)
        assert second.startswith(b"HTTP/1.1 408 "), second
        assert metric(server, "topic_audit_header_timeouts_total", received="nothing") >= 1
        assert metric(server, "topic_audit_header_timeouts_total", received="partial") == 2
    finally:
        server.stop()
    logged = rows(server.db)
    assert [(r["status_code"], r["reason"]) for r in logged] == [
        (408, "header_timeout"),
        (200, None),
        (408, "header_timeout"),
    ]
    slow_row = logged[0]
    assert slow_row["method"] == "POST" and slow_row["path"] == "/callback"
    assert slow_row["query_string"] == f"SdkAppid={APP_ID}&CallbackCommand=x"
    assert slow_row["sdk_app_id"] == APP_ID
    assert TRUNCATED_KEY in json.loads(slow_row["request_headers"])
    assert run_cli("verify", "--db", str(server.db)).returncode == 0


@pytest.mark.slow
def test_x_forwarded_for_cannot_put_an_address_beyond_erasure(tmp_path: Path) -> None:
    """With no trusted proxy, ``X-Forwarded-For`` does not become ``remote_addr`` (evidence, never
    erased): erasing the end user's address leaves it in no file of the data folder."""
    server = _serve(tmp_path)
    try:
        body = samples.sample("after-create")
        query = samples.query(APP_ID, body["CallbackCommand"], TOKEN, client_ip=SUBJECT_IP)
        response = httpx.post(
            f"{server.url}/callback?{query}", json=body, headers={"X-Forwarded-For": SUBJECT_IP}, timeout=5
        )
        assert response.status_code == 200
        assert rows(server.db)[0]["client_ip"] == SUBJECT_IP
        erased = run_cli(
            "erase", "--db", str(server.db), "--ip", SUBJECT_IP, "--reason", "t", "--yes", env=server.env
        )
        assert erased.returncode == 0, erased.stdout + erased.stderr
    finally:
        server.stop()
    files = [path for path in server.db.parent.rglob("*") if path.is_file()]
    assert server.db in files
    holding = [path.name for path in files if SUBJECT_IP.encode() in path.read_bytes()]
    assert holding == [], holding
    [row] = rows(server.db)
    assert row["remote_addr"] == "127.0.0.1" and not row["client_ip"]  # the peer stays, as evidence
