"""Shared fixtures and helpers: real SQLite files under tmp_path, the real app with its lifespan, a real
server, and what more than one test module uses (tests/<subpackage>/ import them from here: ``pythonpath``
in pyproject.toml puts this folder on ``sys.path``, with destination.py, s3store.py, grafana_files.py,
tlog_reference.py and benchmarks/ beside it)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import signal
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
from topic_audit.forwarding import outbox
from topic_audit.log import chain
from topic_audit.metrics import Metrics
from topic_audit.receiver.app import create_app
from topic_audit.settings import Settings
from topic_audit.tencent import samples

# A serve that does not stop is sent SIGABRT for its stacks (Server.stop): no core file from it, or from
# anything else the tests start, whatever the machine's limit.
resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))

APP_ID = "1400000001"
TOKEN = "test-token-7f3a9c1e5b"

TESTS = Path(__file__).resolve().parent
"""This folder: the helpers beside this file, faultfs.c, benchmarks/ (tests sit one level down)."""
ROOT = TESTS.parent
"""The repository: README.md, docs/, dashboard/, grafana/, service/, pyproject.toml."""


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


# -- a data subject's values, and what the tools find (erasure, retention, the off-box copy) ---------
SUBJECT = "erin_subject_42"
OTHER = "leckie"
SUBJECT_IP = "203.0.113.77"


def make_row(n: int, **changes: Any) -> dict[str, Any]:
    """A row as the receiver makes it (an ignored callback, topic ``t<n>``), for the writer's tests."""
    body = f'{{"n": {n}}}'.encode()
    row: dict[str, Any] = {
        "received_at": "2026-11-25T00:00:00.000Z",
        "method": "POST",
        "path": "/callback",
        "query_string": f"n={n}",
        "sdk_app_id": "1",
        "callback_command": "Group.CallbackAfterCreateGroup",
        "client_ip": None,
        "opt_platform": None,
        "request_time": None,
        "remote_addr": "127.0.0.1",
        "request_headers": "{}",
        "request_body": chain.stored_body(body),
        "request_body_sha256": hashlib.sha256(body).hexdigest(),
        "request_body_bytes": len(body),
        "status_code": 200,
        "response_body": "{}",
        "outcome": "ignored",
        "reason": None,
        "detail": None,
        "topic_id": f"t{n}",
        "group_id": None,
        "duplicate_of": None,
        "elapsed_ms": 0.1,
        "client_cert_subject": None,
    }
    row.update(changes)
    return row


def message(sender: str, text: str, to: str = OTHER) -> dict[str, Any]:
    return {
        "CallbackCommand": "Group.CallbackAfterSendMsg",
        "GroupId": "@TGS#_erasure",
        "Type": "Community",
        "From_Account": sender,
        "Operator_Account": sender,
        "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": text}}],
        "MemberList": [{"Member_Account": to}],
    }


def send(url: str, body: dict[str, Any], client_ip: str = "198.51.100.1") -> httpx.Response:
    query = samples.query(APP_ID, body["CallbackCommand"], TOKEN) + f"&ClientIP={client_ip}"
    return httpx.post(f"{url}/callback?{query}", content=json.dumps(body).encode(), timeout=5)


def file_bytes(db: Path) -> dict[str, bytes]:
    found = {}
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{db}{suffix}")
        found[path.name] = path.read_bytes() if path.exists() else b""
    return found


def holding(db: Path, needle: bytes) -> list[str]:
    """The database files whose raw bytes contain ``needle``."""
    return [name for name, data in file_bytes(db).items() if needle in data]


def findings(db: Path) -> list[dict[str, Any]]:
    """What ``topic-audit verify --json`` finds in the log at ``db``."""
    done = run_cli("verify", "--db", str(db), "--json")
    assert done.stdout.startswith("{"), done.stderr
    found: list[dict[str, Any]] = json.loads(done.stdout)["findings"]
    assert (done.returncode == 0) == (not found), done.stdout + done.stderr
    return found


def forge(db: Path, *statements: str) -> None:
    """Change a log as someone with write access to the file would: past every trigger (:func:`alter`
    drops only the append-only ones)."""
    conn = sqlite3.connect(db)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


# -- full-text indexes (reindex, retention) --------------------------------------------------------------
def instances(conn: sqlite3.Connection, index: str) -> list[tuple[Any, ...]]:
    """Every (term, document, column, offset) the index holds."""
    conn.execute(f"CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, {index}, 'instance')")
    try:
        return conn.execute("SELECT term, doc, col, offset FROM vocab ORDER BY 1, 2, 3, 4").fetchall()
    finally:
        conn.execute("DROP TABLE temp.vocab")


def rebuilt_in_one_go(conn: sqlite3.Connection, index: str) -> list[tuple[Any, ...]]:
    """What a fresh index holds: ``audit_log_fts`` rebuilt from ``audit_log``; for ``topics_fts`` (which
    would rebuild from its own copy) a new index filled from ``topics``."""
    if index == "audit_log_fts":
        conn.execute(f"INSERT INTO {index} ({index}) VALUES ('rebuild')")
        return instances(conn, index)
    conn.execute("CREATE VIRTUAL TABLE temp.fresh USING fts5(name, introduction, notification)")
    try:
        conn.execute(
            "INSERT INTO temp.fresh (rowid, name, introduction, notification) "
            "SELECT rowid, name, introduction, notification FROM topics"
        )
        conn.execute("CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(temp, fresh, 'instance')")
        try:
            return conn.execute(
                "SELECT term, doc, col, offset FROM temp.vocab ORDER BY 1, 2, 3, 4"
            ).fetchall()
        finally:
            conn.execute("DROP TABLE temp.vocab")
    finally:
        conn.execute("DROP TABLE temp.fresh")


# -- forwarding's tables, as the forwarder leaves them (Datasette's pages) -------------------------------
def deliver_some(conn: sqlite3.Connection) -> None:
    """Forwarding's tables as the forwarder leaves them: entries 1-30 queued to a destination, the even
    ones delivered, the odd ones failed (a one-attempt schedule), 31-40 still pending."""
    at = "2026-11-25T10:00:00.000Z"
    destination = "http://app.example:9000/callback"
    conn.execute("BEGIN IMMEDIATE")
    outbox.queue(conn, [(n, destination, at) for n in range(1, 41)], 0)
    conn.execute("COMMIT")
    attempts = [
        outbox.Attempt(
            n,
            destination,
            "after",
            1,
            at,
            3.5,
            200 if n % 2 == 0 else 503,
            None if n % 2 == 0 else "http_error",
            None if n % 2 == 0 else "HTTP 503",
            '{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}',
        )
        for n in range(1, 31)
    ]
    outbox.record(conn, attempts, [0], at)


# -- processes and ports -----------------------------------------------------------------------------
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


def scrape(server: Server | str) -> str:
    """The /metrics page of a :class:`Server`, or of the service at a base URL, scraped now."""
    if isinstance(server, str):
        return httpx.get(f"{server}/metrics", timeout=5).text
    return httpx.get(f"{server.url}/metrics", timeout=5, **server.client).text


def metric(server: Server | str, name: str, **labels: str) -> float:
    """:func:`metric_in` of the server's /metrics page, scraped now."""
    return metric_in(scrape(server), name, **labels)


def metric_samples(server: Server | str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of ``name`` on the server's /metrics page, scraped now, by its labels (the sorted
    (label, value) pairs; ``()`` for a sample without labels)."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(scrape(server))
        for sample in family.samples
        if sample.name == name
    }


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``topic-audit ARGS`` as a process, with ``env`` added to this environment (``timeout`` only stops
    one that hangs)."""
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
            "PYTHONFAULTHANDLER": "1",  # SIGABRT prints every thread's stack into the log (see stop)
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
            except subprocess.TimeoutExpired as timed_out:
                # never leave a process behind, and say where it was stuck: every thread's stack
                self.process.send_signal(signal.SIGABRT)
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
                tail = self.log.read_text(errors="replace")[-6000:]
                raise AssertionError(
                    f"serve did not stop within 15 s of SIGTERM; its log ends:\n{tail}"
                ) from timed_out


@pytest.fixture
def server(db_path: Path, tmp_path: Path) -> Iterator[Server]:
    running = Server(db_path, tmp_path / "server.log").start()
    try:
        yield running
    finally:
        running.stop()


class Prometheus:
    """A real Prometheus scraping ``target`` (and ``watch``'s metrics, if given) every second."""

    def __init__(self, binary: str, target: str, folder: Path, watch: str | None = None) -> None:
        config = folder / "prometheus.yml"
        jobs = f"  - job_name: topic-audit\n    static_configs: [{{targets: ['{target}']}}]\n"
        if watch is not None:
            jobs += f"  - job_name: topic-audit-watch\n    static_configs: [{{targets: ['{watch}']}}]\n"
        config.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n" + jobs)
        self.log = (folder / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                "--web.listen-address=127.0.0.1:0",  # the OS picks the port; read once it listens
            ],
            stdout=self.log,
            stderr=self.log,
        )
        self.port = listening_port(self.process, folder / "prometheus.log")
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for(
            lambda: httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200,
            30,
            "prometheus ready",
            0.5,
        )

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", (expr, body)
        result = body["data"]["result"]
        if body["data"]["resultType"] == "scalar":
            return [({}, float(result[1]))]
        return [(series["metric"], float(series["value"][1])) for series in result]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)
        self.log.close()


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
