"""Restarts and upgrades refuse no callback: real ``serve`` processes under steady load, reloaded with
SIGHUP, upgraded (a new version installed between reloads), stopped with SIGTERM, and socket-activated
with a socket held by the test as systemd holds it.

The upgrade is a distribution's metadata installed ahead of the tree's on ``PYTHONPATH``
(``topic_audit-<version>.dist-info``), replaced by the next version's between two reloads, as pip
replaces it: what ``importlib.metadata`` reports, and so ``topic_audit_build_info``, is the installed one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import conftest
import httpx
import pytest
from benchmarks.restarts import APP_ID, TOKEN, Load, environment, start_serve, wait_ready
from conftest import deliver_concurrently, listening_port, metric_samples, require_tool, wait_for
from destination import Destination
from topic_audit.serve import envfile, sockets
from topic_audit.tencent import samples

pytestmark = pytest.mark.slow


def children(pid: int, module: str) -> set[int]:
    """The child processes of ``pid`` running ``python -m <module>``."""
    found = set()
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            if module.encode() in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
                found.add(int(child))
    return found


def receivers(pid: int) -> set[int]:
    return children(pid, "topic_audit.serve.receiver_process")


def writers(pid: int) -> set[int]:
    return children(pid, "topic_audit.serve.writer_process")


def one_writer(pid: int, timeout: float = 30) -> int:
    """Wait until ``serve`` runs one writer process (an earlier generation's retires once its
    receivers have drained); its pid."""
    deadline = time.monotonic() + timeout
    while len(found := writers(pid)) != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(found) == 1, f"writer processes {found}"
    return found.pop()


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def wait_replaced(serve: subprocess.Popen[bytes], old: set[int], timeout: float = 60) -> set[int]:
    """The receivers that replaced ``old`` once every old one has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = receivers(serve.pid)
        if now and not now & old and not any(alive(pid) for pid in old):
            return now
        time.sleep(0.1)
    raise AssertionError(f"receivers {old} not replaced: {receivers(serve.pid)}")


def writable(pid: int) -> set[str]:
    """The files process ``pid`` holds open for writing."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            flags = int(Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split("flags:")[1].split()[0], 8)
            if flags & (os.O_WRONLY | os.O_RDWR):
                found.add(os.readlink(fd))
    return found


def settled(url: str, expected: Callable[[], dict[int, str]]) -> None:
    """Wait until ``topic_audit_build_info`` lists exactly the processes ``expected`` names (a replaced
    generation's writer stops a moment after its receivers)."""
    deadline = time.monotonic() + 10
    while (found := versions(url)) != (wanted := expected()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert found == wanted


def versions(url: str) -> dict[int, str]:
    """pid -> version, from topic_audit_build_info."""
    return {int(dict(k)["pid"]): dict(k)["version"] for k in metric_samples(url, "topic_audit_build_info")}


def answered_since(load: Load, moment: float) -> int:
    """How many callbacks the load sent after ``moment`` (``time.monotonic()``) were answered OK."""
    return sum(1 for r in list(load.results) if r.started > moment and r.status == 200 and r.error is None)


def post(url: str, topic: str, **kwargs: object) -> httpx.Response:
    body = samples.sample("after-create", TopicId=topic)
    query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
    return httpx.post(f"{url}/callback?{query}", json=body, **kwargs)  # type: ignore[arg-type]


def verify(db: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "topic_audit.cli", "verify", "--db", str(db)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def served_at(serve: subprocess.Popen[bytes], log: Path) -> str:
    """The URL of a ``serve`` started on port 0, once it listens (the OS chose the port as it bound)."""
    return f"http://127.0.0.1:{listening_port(serve, log)}"


def stop(serve: subprocess.Popen[bytes], log: Path) -> None:
    serve.send_signal(signal.SIGTERM)
    try:
        assert serve.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if serve.poll() is None:
            serve.kill()


def install_version(site: Path, version: str) -> None:
    for old in site.glob("topic_audit-*.dist-info"):
        shutil.rmtree(old)
    info = site / f"topic_audit-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: topic-audit\nVersion: {version}\n")


def test_two_reloads_under_load_one_an_upgrade_refuse_nothing(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_version(site, "7.0.0")
    db, log = tmp_path / "audit.db", tmp_path / "serve.log"
    env = environment(db, 0, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    serve = start_serve(env, log)
    try:
        url = served_at(serve, log)
        wait_ready(url)
        first = receivers(serve.pid)
        assert set(versions(url).values()) == {"7.0.0"}
        load = Load(url, 200)
        thread = load.start()
        time.sleep(2)
        serve.send_signal(signal.SIGHUP)
        second = wait_replaced(serve, first)
        writer = one_writer(serve.pid)  # the first generation's writer retired
        settled(url, lambda: dict.fromkeys({serve.pid, *second, writer}, "7.0.0"))
        install_version(site, "7.1.0")  # the upgrade, installed while the old version serves
        time.sleep(1)
        serve.send_signal(signal.SIGHUP)
        third = wait_replaced(serve, second)
        replaced = time.monotonic()
        wait_for(
            lambda: answered_since(load, replaced) >= 400, 30, "400 callbacks answered by the new processes"
        )
        load.stop(thread)

        # serve itself keeps the version it started with; every receiver, and the writer, runs the one
        # installed now
        writer = one_writer(serve.pid)
        settled(url, lambda: {serve.pid: "7.0.0", **dict.fromkeys({*third, writer}, "7.1.0")})
        assert metric_samples(url, "topic_audit_restarts_total")[(("kind", "reload"),)] == 2
        assert len(load.results) > 1000
        assert load.failed == [], load.failed[:5]
        assert load.slowest < 2.0
    finally:
        stop(serve, log)
    assert load.missing_from(db) == []
    verify(db)


def test_sigterm_under_load_exits_0_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    db, log = tmp_path / "audit.db", tmp_path / "serve.log"
    serve = start_serve(environment(db, 0), log)
    try:
        url = served_at(serve, log)
        wait_ready(url)
        load = Load(url, 200)
        thread = load.start()
        time.sleep(2)
    finally:
        stop(serve, log)
    load.stop(thread)
    answered = [r for r in load.results if r.status == 200]
    assert len(answered) > 200
    assert load.missing_from(db) == []
    verify(db)
    assert "Traceback" not in log.read_text()


def test_socket_activation_answers_what_arrives_while_stopped(tmp_path: Path) -> None:
    held = socket.socket()  # as systemd holds topic-audit.socket
    held.bind(("127.0.0.1", 0))
    held.listen(2048)
    port = held.getsockname()[1]
    db, log = tmp_path / "audit.db", tmp_path / "serve.log"
    env = environment(db, 1)  # the port in the environment is not the one served: the socket is
    url = f"http://127.0.0.1:{port}"
    serve = start_serve(env, log, held)
    try:
        wait_ready(url)
        assert post(url, "before-stop").status_code == 200
        load = Load(url, 100)
        thread = load.start()
        time.sleep(1)
        stop(serve, log)
        answers: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: answers.append(post(url, "while-stopped", timeout=60)))
        waiting.start()
        time.sleep(1.5)
        assert waiting.is_alive() and not answers  # queued in the socket, not refused
        serve = start_serve(env, log, held)
        waiting.join(60)
        assert answers and answers[0].status_code == 200, answers
        time.sleep(1)
        load.stop(thread)
    finally:
        stop(serve, log)
        held.close()
    assert load.failed == [], load.failed[:5]
    assert len(load.results) > 300
    assert load.missing_from(db) == []
    assert "while-stopped" not in [r.topic for r in load.results]
    assert f":{port}/callback" in log.read_text() and "socket handed over by systemd" in log.read_text()
    verify(db)


def test_a_reload_with_a_broken_setting_keeps_serving(tmp_path: Path) -> None:
    settings = tmp_path / "topic-audit.env"
    settings.write_text("# serve's settings\nTOPIC_AUDIT_MAX_BODY_BYTES=65536\n")
    db, log = tmp_path / "audit.db", tmp_path / "serve.log"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # what Type=notify listens on
    systemd.bind(str(tmp_path / "notify"))
    env = environment(db, 0, TOPIC_AUDIT_ENV_FILE=str(settings), NOTIFY_SOCKET=str(tmp_path / "notify"))
    serve = start_serve(env, log)
    big = {**samples.sample("after-create", TopicId="big"), "Introduction": "x" * 3000}
    query = samples.query(APP_ID, big["CallbackCommand"], TOKEN)
    try:
        url = served_at(serve, log)
        wait_ready(url)
        first = receivers(serve.pid)
        settings.write_text("TOPIC_AUDIT_MAX_BODY_BYTES=10\n")
        serve.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in log.read_text(), 20, "the reload refused", 0.1)
        (line,) = [line for line in log.read_text().splitlines() if "reload refused" in line]
        assert "TOPIC_AUDIT_MAX_BODY_BYTES must be at least 1024, got 10" in line
        assert "keep serving" in line
        time.sleep(1)
        assert receivers(serve.pid) == first
        assert post(url, "still-served").status_code == 200
        assert httpx.post(f"{url}/callback?{query}", json=big).status_code == 200

        settings.write_text("TOPIC_AUDIT_MAX_BODY_BYTES=2048\n")  # a good change takes effect
        serve.send_signal(signal.SIGHUP)
        wait_replaced(serve, first)
        assert httpx.post(f"{url}/callback?{query}", json=big).status_code == 413
        assert metric_samples(url, "topic_audit_restarts_total")[(("kind", "reload"),)] == 1
    finally:
        stop(serve, log)
    systemd.setblocking(False)
    told = []
    with contextlib.suppress(BlockingIOError):
        while True:
            told.append(systemd.recv(4096).decode().split("\n")[0])
    systemd.close()
    assert told == ["READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    verify(db)


@pytest.mark.parametrize(("server", "workers"), [("uvicorn", "2"), ("granian", "1"), ("granian", "2")])
def test_reload_in_every_configuration(tmp_path: Path, server: str, workers: str) -> None:
    db, log = tmp_path / "audit.db", tmp_path / "serve.log"
    env = environment(db, 0, TOPIC_AUDIT_SERVER=server, TOPIC_AUDIT_WORKERS=workers)
    serve = start_serve(env, log)
    try:
        url = served_at(serve, log)
        wait_ready(url)
        first = receivers(serve.pid)
        assert len(first) == (int(workers) if server == "uvicorn" else 1)
        serve.send_signal(signal.SIGHUP)
        wait_replaced(serve, first)
        assert post(url, "after-reload").status_code == 200
        # serve, each serving process and the writer (the old generation's writer stopped after them)
        wait_for(lambda: len(versions(url)) == 2 + int(workers), 10, f"{2 + int(workers)} processes", 0.1)
    finally:
        stop(serve, log)
    verify(db)


def test_every_callback_is_still_forwarded_across_a_reload(tmp_path: Path) -> None:
    app = Destination()  # the app's own handler
    db, log = tmp_path / "audit.db", tmp_path / "serve.log"
    serve = start_serve(environment(db, 0, TOPIC_AUDIT_FORWARD_URL=app.url), log)
    try:
        url = served_at(serve, log)
        wait_ready(url)
        first = receivers(serve.pid)
        load = Load(url, 50)
        thread = load.start()
        time.sleep(1)
        serve.send_signal(signal.SIGHUP)
        wait_replaced(serve, first)
        time.sleep(1)
        load.stop(thread)
        assert load.failed == [], load.failed[:5]
        conn = sqlite3.connect(db)
        forwarded = {row[0] for row in conn.execute("SELECT id FROM audit_log WHERE status_code = 200")}
        conn.close()
        # the reload's delivery process takes over from the old one
        wait_for(lambda: forwarded <= app.ids(), 30, "every forwarded callback at the app", 0.2)
    finally:
        stop(serve, log)
        app.stop()
    verify(db)


def test_a_receiver_that_dies_is_replaced(tmp_path: Path) -> None:
    db, log = tmp_path / "audit.db", tmp_path / "serve.log"
    serve = start_serve(environment(db, 0), log)
    try:
        url = served_at(serve, log)
        wait_ready(url)
        (first,) = receivers(serve.pid)
        os.kill(first, signal.SIGKILL)
        wait_replaced(serve, {first})
        wait_ready(url)
        assert post(url, "after-crash").status_code == 200
        assert metric_samples(url, "topic_audit_restarts_total")[(("kind", "crash"),)] == 1
        assert first not in versions(url)
    finally:
        stop(serve, log)


def test_a_writer_killed_under_load_loses_nothing_acknowledged_and_is_replaced(tmp_path: Path) -> None:
    db, log = tmp_path / "audit.db", tmp_path / "serve.log"
    serve = start_serve({**environment(db, 0), "TOPIC_AUDIT_WORKERS": "2"}, log)
    try:
        url = served_at(serve, log)
        wait_ready(url)
        assert len(receivers(serve.pid)) == 2
        (writer,) = writers(serve.pid)
        load = Load(url, rate=200)
        thread = load.start()
        time.sleep(1.5)
        os.kill(writer, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(
            lambda: (
                len(found := writers(serve.pid)) == 1
                and writer not in found
                and answered_since(load, killed) >= 400
            ),
            30,
            "a new writer, and 400 callbacks answered since the kill",
        )
        load.stop(thread)
        (replacement,) = writers(serve.pid)
        assert replacement != writer
        # What was answered OK is in the log; what the dead writer had not answered was refused (503),
        # never acknowledged; the rest of the load, before and after, went through.
        assert load.missing_from(db) == []
        refused = [r for r in load.failed if r.status == 503]
        assert len(refused) == len(load.failed), [r.error for r in load.failed[:5]]
        assert len(load.results) - len(refused) > 400
        assert post(url, "after-writer-crash").status_code == 200
        assert metric_samples(url, "topic_audit_restarts_total")[(("kind", "crash"),)] == 1
        errors = metric_samples(url, "topic_audit_audit_append_errors_total")[()]
        assert errors == len(refused)
    finally:
        stop(serve, log)
    verify(db)


def test_every_receiver_feeds_one_writer_and_metrics_are_exact(tmp_path: Path) -> None:
    """Three receivers and forwarding: one writer process commits the rows and the delivery attempts."""
    app = Destination()  # the app's own handler
    db, log = tmp_path / "audit.db", tmp_path / "serve.log"
    env = {**environment(db, 0, TOPIC_AUDIT_FORWARD_URL=app.url), "TOPIC_AUDIT_WORKERS": "3"}
    env |= {"TOPIC_AUDIT_SDKAPPID": conftest.APP_ID, "TOPIC_AUDIT_TOKEN": conftest.TOKEN}
    serve = start_serve(env, log)
    try:
        url = served_at(serve, log)
        wait_ready(url)
        assert len(receivers(serve.pid)) == 3 and len(writers(serve.pid)) == 1
        answers = deliver_concurrently(url, 300, "fed")
        assert [a.status_code for a in answers] == [200] * 300
        wait_for(lambda: delivered(db) >= 300, 30, "300 deliveries", 0.1)
        assert delivered(db) == 300
        # Only the writer process writes the database: no receiver holds it open for writing, and the
        # delivery process (one, the supervisor's, whatever the receivers) has no write connection.
        (writer,) = writers(serve.pid)
        assert f"{db}-wal" in writable(writer)
        deliverers = children(serve.pid, "topic_audit.serve.delivery_process")
        assert len(deliverers) == 1
        assert not any(children(pid, "topic_audit.serve.delivery_process") for pid in receivers(serve.pid))
        for pid in receivers(serve.pid):
            assert not writable(pid) & {str(db), f"{db}-wal"}
        for pid in deliverers:  # (its read-only connection opens the WAL read-write: SQLite's way)
            assert str(db) not in writable(pid)
        # Whichever receiver answers /metrics, it reports the writer's exact figures.
        for _ in range(6):
            accepted = metric_samples(url, "topic_audit_callbacks_total")
            key = (("command", "Group.CallbackAfterCreateTopic"), ("outcome", "accepted"), ("reason", "none"))
            assert accepted[key] == 300
            assert metric_samples(url, "topic_audit_log_entries")[()] == 300
    finally:
        stop(serve, log)
        app.stop()
    verify(db)


def delivered(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM deliveries WHERE error IS NULL").fetchone()[0])
    finally:
        conn.close()


def test_the_units_verify(tmp_path: Path) -> None:
    written = subprocess.run(
        [sys.executable, "-m", "topic_audit.cli", "units", "--to", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert written.stdout.split() == [
        str(tmp_path / "topic-audit.socket"),
        str(tmp_path / "topic-audit.service"),
    ]
    service = (tmp_path / "topic-audit.service").read_text()
    assert f"ExecStart={Path(sys.executable).with_name('topic-audit')} serve" in service
    for hardening in ("ProtectSystem=strict", "NoNewPrivileges=true", "User=topic-audit", "StateDirectory="):
        assert hardening in service
    key = next(line for line in service.splitlines() if "TOPIC_AUDIT_SIGNING_KEY" in line)
    database = next(line for line in service.splitlines() if "TOPIC_AUDIT_DB=" in line)
    assert Path(key.split("=", 2)[2]).parent != Path(database.split("=", 2)[2]).parent
    analyze = require_tool("systemd-analyze")
    checked = subprocess.run(
        [analyze, "verify", str(tmp_path / "topic-audit.socket"), str(tmp_path / "topic-audit.service")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr


def _hardening(unit: str) -> list[str]:
    """A service's sandbox: the lines from its hardening comment to [Install]."""
    lines = unit.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Hardening:"))
    return lines[start : lines.index("[Install]")]


def test_the_cluster_units_verify(tmp_path: Path) -> None:
    """``units --role``: cluster mode's receiver (socket-activated, no state) and writer (started again
    after exit 75, the log and the key in their own directories), both as hardened as the single-machine
    service, and one machine may run both."""
    command = [sys.executable, "-m", "topic_audit.cli", "units", "--to", str(tmp_path)]
    subprocess.run(command, capture_output=True, check=True)
    written = subprocess.run(
        [*command, "--role", "receiver", "--role", "writer"], capture_output=True, text=True, check=True
    )
    assert written.stdout.split() == [
        str(tmp_path / "topic-audit-receiver.socket"),
        str(tmp_path / "topic-audit-receiver.service"),
        str(tmp_path / "topic-audit-writer.service"),
    ]
    alone = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TOPIC_AUDIT_UNITS_ROLE": "writer"},
    )
    assert alone.stdout.split() == [str(tmp_path / "topic-audit-writer.service")]
    single = (tmp_path / "topic-audit.service").read_text()
    receiver = (tmp_path / "topic-audit-receiver.service").read_text()
    writer = (tmp_path / "topic-audit-writer.service").read_text()
    socket_unit = (tmp_path / "topic-audit-receiver.socket").read_text()
    here = Path(sys.executable).with_name("topic-audit")
    assert f"ExecStart={here} serve --role receiver --env-file /etc/topic-audit/receiver.env\n" in receiver
    assert f"ExecStart={here} serve --role writer --env-file /etc/topic-audit/writer.env\n" in writer
    for unit in (receiver, writer):
        assert _hardening(unit) == _hardening(single)
        assert "User=topic-audit\n" in unit and "UMask=0077\n" in unit
    # The receiver: socket-activated, reloaded like serve, and nothing of the log on its machine.
    assert "Type=notify\n" in receiver and "ExecReload=/bin/kill -HUP $MAINPID\n" in receiver
    assert "Requires=topic-audit-receiver.socket\n" in receiver
    assert "Service=topic-audit-receiver.service\n" in socket_unit
    assert "StateDirectory" not in receiver and "TOPIC_AUDIT_DB" not in receiver
    # The writer: it does not notify, is never reloaded (SIGHUP would end it), and comes back after
    # losing the lease (exit 75), however often; its address is not the receiver's.
    assert "Type=exec\n" in writer and "ExecReload" not in writer
    assert "Restart=on-failure\n" in writer and "RestartForceExitStatus=75\n" in writer
    assert "StartLimitIntervalSec=0\n" in writer
    from topic_audit.cluster.writer import LOST_EXIT

    assert LOST_EXIT == 75
    key = next(line for line in writer.splitlines() if "TOPIC_AUDIT_SIGNING_KEY" in line)
    database = next(line for line in writer.splitlines() if "TOPIC_AUDIT_DB=" in line)
    assert Path(key.split("=", 2)[2]).parent != Path(database.split("=", 2)[2]).parent
    assert "Environment=TOPIC_AUDIT_PORT=8010\n" in writer and "ListenStream=0.0.0.0:8000\n" in socket_unit
    analyze = require_tool("systemd-analyze")
    units = sorted(str(p) for p in tmp_path.iterdir())
    checked = subprocess.run([analyze, "verify", *units], capture_output=True, text=True)
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr


def test_only_sockets_meant_for_this_process_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert sockets.inherited() is None
    assert "LISTEN_FDS" not in os.environ  # nothing started later takes them either


def test_the_env_file_format() -> None:
    text = "# comment\n\nexport TOPIC_AUDIT_PORT=8001\nTOPIC_AUDIT_TOKEN=\"a b\"\nTOPIC_AUDIT_DB='x.db'\n"
    assert envfile.parse(text) == {
        "TOPIC_AUDIT_PORT": "8001",
        "TOPIC_AUDIT_TOKEN": "a b",
        "TOPIC_AUDIT_DB": "x.db",
    }
    with pytest.raises(envfile.SettingsError, match="line 1"):
        envfile.parse("not a setting")
