"""Shared fixtures: real SQLite files under tmp_path, the real app with its lifespan, a real server."""

from __future__ import annotations

import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient
from topic_audit import samples
from topic_audit.app import create_app
from topic_audit.metrics import Metrics
from topic_audit.settings import Settings

APP_ID = "1400000001"
TOKEN = "test-token-7f3a9c1e5b"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def settings(db_path: Path) -> Settings:
    return Settings(sdk_app_id=APP_ID, token=TOKEN, db=db_path)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def client(settings: Settings, metrics: Metrics) -> Iterator[TestClient[Any]]:
    with TestClient(create_app(settings, metrics)) as test_client:
        yield test_client


Post = Callable[..., httpx.Response]


@pytest.fixture
def post(client: TestClient[Any]) -> Post:
    """Post a body (dict, bytes or str) signed like Tencent does; keyword arguments adjust the query."""

    def _post(
        body: Any, command: str | None = None, *, query: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        if isinstance(body, dict):
            command = command or body.get("CallbackCommand")
            content = json.dumps(body, ensure_ascii=False).encode()
        else:
            content = body.encode() if isinstance(body, str) else body
        if query is None:
            query = samples.query(APP_ID, command or "", TOKEN)
        return client.post(f"/callback?{query}", content=content, **kwargs)

    return _post


def random_history(post: Post, rng: random.Random, count: int) -> None:
    """``count`` deliveries of every kind for 12 topics, redeliveries and multi-topic destroys included."""
    ids = [f"{samples.DOC_TOPIC}-{i}" for i in range(12)]
    for _ in range(count):
        roll, topic = rng.random(), rng.choice(ids)
        if roll < 0.35:
            body = samples.sample("after-create", TopicId=topic, Name=f"n{rng.randrange(5)}")
        elif roll < 0.7:
            body = samples.sample("info-changed", TopicId=topic, Name=f"n{rng.randrange(3)}")
            if rng.random() < 0.3:
                body["UserDefinedDataList"] = [{"Key": "k", "Value": str(rng.randrange(3))}]
        elif roll < 0.85:
            body = samples.sample("destroyed", TopicIdList=rng.sample(ids, rng.randrange(1, 3)))
        else:
            body = samples.sample(
                rng.choice(["before-create", "group-created", "info-changed-without-topic"])
            )
        post(body)


def alter(db: Path, *statements: str, params: tuple[Any, ...] = ()) -> None:
    """Run statements on a log as someone with write access to the file would: past its append-only
    triggers (dropped first)."""
    conn = sqlite3.connect(db)
    for table in ("audit_log", "deliveries"):
        for trigger in ("no_update", "no_delete", "append_only"):
            conn.execute(f"DROP TRIGGER IF EXISTS {table}_{trigger}")
    for statement in statements:
        conn.execute(statement, params if "?" in statement else ())
    conn.commit()
    conn.close()


def rows(db: Path, where: str = "1", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM audit_log WHERE {where} ORDER BY id", params)]
    finally:
        conn.close()


def topics(db: Path) -> dict[str, dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return {r["topic_id"]: dict(r) for r in conn.execute("SELECT * FROM topics")}
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``topic-audit serve`` as a real process on loopback."""

    def __init__(
        self, db: Path, log: Path, env: dict[str, str] | None = None, client: dict[str, Any] | None = None
    ) -> None:
        self.db, self.log, self.port = db, log, free_port()
        self.client = client or {}
        """httpx arguments to reach it (``verify`` and ``cert`` when it speaks HTTPS)."""
        scheme = "https" if env and env.get("TOPIC_AUDIT_TLS_CERT") else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "TOPIC_AUDIT_SDKAPPID": APP_ID,
            "TOPIC_AUDIT_TOKEN": TOKEN,
            "TOPIC_AUDIT_DB": str(db),
            "TOPIC_AUDIT_PORT": str(self.port),
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "topic_audit.cli", "serve"], env=self.env, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=0.5, **self.client).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()  # never leave a process behind, even when the test failed
                self.process.wait(timeout=10)
                raise


@pytest.fixture
def server(db_path: Path, tmp_path: Path) -> Iterator[Server]:
    running = Server(db_path, tmp_path / "server.log").start()
    try:
        yield running
    finally:
        running.stop()


def require_tool(name: str) -> str:
    """The path of a system tool; skips the test when it is absent, unless TOPIC_AUDIT_REQUIRE_TOOLS=1."""
    import shutil

    path = shutil.which(name)
    if path is None:
        if os.environ.get("TOPIC_AUDIT_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{name} is required (TOPIC_AUDIT_REQUIRE_TOOLS=1) but not installed")
        pytest.skip(f"{name} is not installed (apt-get install {name})")
    return path
