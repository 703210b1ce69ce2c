"""Shared fixtures: real SQLite files under tmp_path, the real app with its lifespan, a real server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families
from topic_audit.metrics import Metrics
from topic_audit.receiver.app import create_app
from topic_audit.settings import Settings
from topic_audit.tencent import samples

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
    """A port free at the moment of asking (bound and closed again): another process can take it before
    the caller binds it. Prefer starting the process on port 0 and asking it (:func:`listening_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _process_tree(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(current := todo.pop())
        todo.extend(parents.get(current, []))
    return tree


def listening_ports(pid: int) -> set[int]:
    """The TCP ports that process ``pid`` and its descendants listen on (Linux: read from /proc)."""
    inodes: set[str] = set()
    for member in _process_tree(pid):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{member}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def listening_port(process: subprocess.Popen[Any], log: Path | None = None, seconds: float = 30) -> int:
    """The one port a process started with port 0 listens on, once it does: the OS chose it, so no other
    process can have taken it first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        ports = listening_ports(process.pid)
        assert len(ports) <= 1, f"process {process.pid} listens on several ports: {sorted(ports)}"
        if ports:
            return ports.pop()
        time.sleep(0.05)
    text = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"process {process.pid} is not listening (exit code {process.poll()}): {text}")


Launch = Callable[[], tuple[subprocess.Popen[Any], set[int]]]


def start_on_free_ports(
    launch: Launch, log: Path, tries: int = 5, seconds: float = 60
) -> subprocess.Popen[Any]:
    """For a program that cannot be told port 0: ``launch`` starts it on ports it picks (free a moment
    before); it is ready once it listens on all of them itself. One that exits first (another process
    took a port meanwhile) is started again on other ports."""
    for _ in range(tries):
        process, ports = launch()
        deadline = time.monotonic() + seconds
        while process.poll() is None:
            if ports <= listening_ports(process.pid):
                return process
            if time.monotonic() > deadline:
                process.kill()
                process.wait(10)
                raise RuntimeError(
                    f"not listening on {sorted(ports)} after {seconds} s: {log.read_text()[-3000:]}"
                )
            time.sleep(0.1)
    raise RuntimeError(f"exited {tries} times before listening: {log.read_text(errors='replace')[-3000:]}")


def wait_for(
    check: Callable[[], object], seconds: float = 20, what: str = "", interval: float = 0.05
) -> float:
    """Poll ``check`` until it returns something true (an HTTP or SQLite error counts as not yet); returns
    the seconds it took."""
    started = time.monotonic()
    error: Exception | None = None
    while time.monotonic() - started < seconds:
        try:
            if check():
                return time.monotonic() - started
        except (httpx.HTTPError, sqlite3.Error) as exc:
            error = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {seconds} s waiting for {what or check}" + (f": {error}" if error else "")
    )


def metric_in(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` in a /metrics page."""
    found = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]
    assert found, f"{name}{labels} not exported"
    return float(sum(found))


def metric(server: Server, name: str, **labels: str) -> float:
    """:func:`metric_in` of the server's /metrics page, scraped now."""
    return metric_in(httpx.get(f"{server.url}/metrics", timeout=5, **server.client).text, name, **labels)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``topic-audit ARGS`` as a process, with ``env`` added to this environment."""
    return subprocess.run(
        [sys.executable, "-m", "topic_audit.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def deliver_concurrently(url: str, count: int, prefix: str) -> list[httpx.Response]:
    """``count`` signed after-create callbacks at once, for topics ``{prefix}-0`` and on."""

    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(timeout=10, limits=limits) as client:

            async def one(n: int) -> httpx.Response:
                body = samples.sample("after-create", TopicId=f"{prefix}-{n}")
                query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
                return await client.post(f"{url}/callback?{query}", json=body)

            return await asyncio.gather(*(one(n) for n in range(count)))

    return asyncio.run(main())


class Server:
    """``topic-audit serve`` as a real process on loopback."""

    def __init__(
        self, db: Path, log: Path, env: dict[str, str] | None = None, client: dict[str, Any] | None = None
    ) -> None:
        self.db, self.log = db, log
        self.client = client or {}
        """httpx arguments to reach it (``verify`` and ``cert`` when it speaks HTTPS)."""
        self.scheme = "https" if env and env.get("TOPIC_AUDIT_TLS_CERT") else "http"
        self.env = {
            **os.environ,
            "TOPIC_AUDIT_SDKAPPID": APP_ID,
            "TOPIC_AUDIT_TOKEN": TOKEN,
            "TOPIC_AUDIT_DB": str(db),
            "TOPIC_AUDIT_PORT": "0",  # the OS picks a free port when it binds; asked once it listens
            **(env or {}),
        }
        self.port = 0
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "topic_audit.cli", "serve"], env=self.env, stdout=out, stderr=out
            )
        self.port = int(self.env["TOPIC_AUDIT_PORT"]) or listening_port(self.process, self.log)
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
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


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose tool or facility this machine lacks; with TOPIC_AUDIT_REQUIRE_TOOLS=1 (CI, which
    installs them all) fail it instead, so that nothing the suite covers is silently skipped there. Every
    skip in the suite goes through here."""
    if os.environ.get("TOPIC_AUDIT_REQUIRE_TOOLS") == "1":
        pytest.fail(f"required (TOPIC_AUDIT_REQUIRE_TOOLS=1): {reason}")
    pytest.skip(reason)


def require_tool(name: str, package: str | None = None) -> str:
    """The path of a system tool; skips the test when it is absent (see :func:`unavailable`)."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (apt-get install {package or name})")
    return path


SLOW_ELSEWHERE: dict[str, set[str] | None] = {
    "test_forward.py": None,  # None: every test of the module
    "test_crash.py": None,
    "test_restarts.py": None,
    "test_browser.py": None,
    "test_rebuild.py": {
        "test_rebuild_restores_exactly_what_the_log_gives",
        "test_rebuilding_beside_a_running_receiver",
    },
    "test_explore.py": {"test_write_sql_is_refused"},
    "test_retention.py": {
        "test_serve_runs_retention_while_answering",
        "test_retention_behind_fires_in_prometheus",
    },
    "test_erasure.py": {"test_an_erase_killed_halfway_leaves_complete_records_and_can_be_finished"},
    "test_chain.py": {
        "test_fast_canonical_form_equals_the_reference",
        "test_fast_query_parsing_matches_the_standard_library",
        "test_received_at_matches_datetime",
    },
}
"""Tests of more than a few seconds (``--durations``) in modules that do not mark them ``slow`` themselves
yet; a module's own ``pytestmark``/``@pytest.mark.slow`` is the better place, and this list shrinks as they
move there."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = SLOW_ELSEWHERE.get(item.path.name, set())
        if names is None or getattr(item, "originalname", item.name) in names:
            item.add_marker(pytest.mark.slow)
