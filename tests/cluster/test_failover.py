"""The failure table of cluster mode, the rows with every role: two receivers behind HAProxy, an active
and a standby writer replicating to SeaweedFS with Litestream, under ~200 callbacks a second. Each test
prints what it measured."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import run_cli, wait_for
from processes import (
    HAProxy,
    Load,
    NatsCluster,
    applied,
    exactly_once,
    holds_lease,
    needs_nats,
    ready,
    role,
)
from processes import nats_cluster_fixture as nats_cluster_fixture
from s3store import SeaweedFS

pytestmark = [needs_nats, pytest.mark.slow]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    running = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        running.bucket("cluster")
        yield running
    finally:
        running.stop()


def test_a_receiver_killed_leaves_haproxy_the_other(tmp_path: Path, nats_cluster: NatsCluster) -> None:
    writer = role(tmp_path, nats_cluster, "writer-a", "writer").start()
    receivers = [role(tmp_path, nats_cluster, f"receiver-{n}", "receiver").start() for n in (1, 2)]
    proxy = HAProxy(tmp_path, receivers).start()
    try:
        wait_for(lambda: ready(writer) and all(ready(r) for r in receivers), 30, "every role ready")
        load = Load(proxy.url, "kill-receiver")
        time.sleep(5)
        assert receivers[0].process is not None
        killed = time.time()
        receivers[0].process.send_signal(signal.SIGKILL)
        time.sleep(10)
        load.stop()
        failed = load.failed()
        late = load.failed(after=killed + 0.05)
        print(
            f"\nkilled receiver-1 behind HAProxy: {len(load.answers)} callbacks, {len(load.ok)} answered 200, "
            f"{len(failed)} failed ({len(late)} sent after the kill)"
        )
        assert not late, f"callbacks sent after the kill failed: {late[:5]}"
        wait_for(lambda: len(applied(writer.db)) >= len(load.ok), 60, "the writer to apply every answer")
        exactly_once(writer.db, load.ok)
    finally:
        proxy.stop()
        for receiver in receivers:
            receiver.stop()
        writer.stop()


def test_the_active_writer_killed_with_its_disk_is_replaced_by_the_standby(
    tmp_path: Path, nats_cluster: NatsCluster, store: SeaweedFS
) -> None:
    replica = {
        **store.env,
        "TOPIC_AUDIT_REPLICA_URL": "s3://cluster/failover",
        "TOPIC_AUDIT_REPLICA_ENDPOINT": store.endpoint,
        "TOPIC_AUDIT_CHECKPOINT_SECONDS": "1",
    }
    active = role(tmp_path, nats_cluster, "writer-a", "writer", **replica).start()
    wait_for(lambda: ready(active), 60, "the first writer to hold the lease")
    standby = role(tmp_path, nats_cluster, "writer-b", "writer", **replica).start()
    receivers = [role(tmp_path, nats_cluster, f"receiver-{n}", "receiver").start() for n in (1, 2)]
    proxy = HAProxy(tmp_path, receivers).start()
    try:
        wait_for(lambda: all(ready(r) for r in receivers), 30, "the receivers ready")
        assert not holds_lease(standby)
        load = Load(proxy.url, "failover")
        wait_for(
            lambda: len(store.keys("cluster", "failover/checkpoints/")) >= 3, 60, "published checkpoints"
        )
        time.sleep(3)
        assert active.process is not None
        killed = time.monotonic()
        active.process.send_signal(signal.SIGKILL)
        active.process.wait(10)
        shutil.rmtree(active.db.parent)  # its disk is gone with it
        took = wait_for(lambda: holds_lease(standby), 30, "the standby to take the lease", interval=0.1)
        caught_up = wait_for(lambda: ready(standby), 60, "the standby to restore and catch up", interval=0.2)
        time.sleep(3)
        load.stop()
        wait_for(lambda: len(applied(standby.db)) >= len(load.ok), 60, "the standby to apply every answer")
        print(
            f"\nkilled the active writer and deleted its disk: {len(load.answers)} callbacks, "
            f"{len(load.ok)} answered 200, {len(load.failed())} failed; the standby held the lease after "
            f"{took:.1f} s and was caught up {took + caught_up:.1f} s after the kill"
        )
        assert took <= 10.0
        assert not load.failed(), "answers stopped"
        exactly_once(standby.db, load.ok)
        assert time.monotonic() - killed < 180
        verified = run_cli("verify", "--db", str(standby.db))
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert httpx.get(f"{standby.url}/readyz", timeout=5).status_code == 200
        standby.stop()  # a clean stop publishes its last checkpoints once the replica holds them
        # every checkpoint published, before and after the failover, holds for the log the standby has
        published = tmp_path / "published.checkpoints.jsonl"
        client = store.client()
        lines = [
            client.get_object(Bucket="cluster", Key=key)["Body"].read().decode().strip()
            for key in store.keys("cluster", "failover/checkpoints/")
        ]
        published.write_text("\n".join(lines) + "\n")
        sizes = [json.loads(line)["log_size"] for line in lines]
        assert sizes == sorted(sizes)
        watched = run_cli(
            "watch",
            "--db",
            str(standby.db),
            "--checkpoint-file",
            str(published),
            "--rounds",
            "1",
            "--metrics-port",
            "0",
        )
        assert watched.returncode == 0, watched.stdout + watched.stderr
        print(f"{len(lines)} published checkpoints (log sizes {sizes[0]}..{sizes[-1]}): watch sees no fork")
    finally:
        proxy.stop()
        for receiver in receivers:
            receiver.stop()
        standby.stop()
        active.stop()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_a_writer_stopped_while_it_restores_exits_0_and_leaves_no_copy(
    tmp_path: Path, nats_cluster: NatsCluster, store: SeaweedFS
) -> None:
    """A stop cuts a takeover's restore short (one can take minutes): the writer exits 0 at once rather
    than waiting for it, and the restore stops with it; the copy it was restoring into beside the log is
    removed as it starts again.
    The slow restore is a stand-in: a ``litestream`` that writes a partial copy and waits."""
    started = tmp_path / "restore.pid"
    slow = tmp_path / "litestream"
    slow.write_text(
        f'#!/bin/sh\nfor last; do :; done\necho "a partial copy" > "$last"\necho $$ > {started}.new\n'
        f"mv {started}.new {started}\nexec sleep 120\n"
    )
    slow.chmod(0o755)
    replica = {
        **store.env,
        "TOPIC_AUDIT_REPLICA_URL": "s3://cluster/cut-short",
        "TOPIC_AUDIT_REPLICA_ENDPOINT": store.endpoint,
    }
    writer = role(tmp_path, nats_cluster, "writer-a", "writer", **replica, TOPIC_AUDIT_LITESTREAM=str(slow))
    writer.start()
    try:
        wait_for(
            lambda: started.exists() and "restoring" in httpx.get(f"{writer.url}/readyz").text,
            30,
            "the writer to be restoring",
        )
        assert writer.process is not None
        stopping = time.monotonic()
        writer.process.terminate()
        code = writer.process.wait(30)
        took = time.monotonic() - stopping
        print(f"\nstopped while restoring: exit {code} in {took:.2f} s")
        assert code == 0, writer.log.read_text()[-3000:]
        assert took < 5
        left = list(writer.db.parent.glob("topic-audit-takeover-*"))
        assert len(left) == 1 and any(left[0].iterdir()), "the cut-short restore's folder, with its copy"
        restoring = int(started.read_text())
        wait_for(lambda: not alive(restoring), 10, "the restore to stop with the writer")
        del writer.env["TOPIC_AUDIT_LITESTREAM"]  # the real one: the store holds no replica yet
        writer.start()
        wait_for(lambda: ready(writer), 60, "the writer, started again, to be active")
        assert not left[0].exists()
        assert "left by processes that died" in writer.log.read_text()
    finally:
        writer.stop()
