"""Cluster mode end to end: a callback answered by a receiver is applied once by the writer; a writer
stopped hands the lease over."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
from conftest import run_cli, wait_for
from processes import (
    NatsCluster,
    applied,
    callback,
    exactly_once,
    holds_lease,
    needs_nats,
    ready,
    role,
    topic_ids,
)
from processes import nats_cluster_fixture as nats_cluster_fixture

pytestmark = needs_nats


def test_a_callback_is_answered_once_the_intake_stored_it_and_applied_once(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    writer = role(tmp_path, nats_cluster, "writer-a", "writer").start()
    receiver = role(tmp_path, nats_cluster, "receiver-1", "receiver").start()
    try:
        wait_for(lambda: ready(writer), 30, "the writer to hold the lease")
        wait_for(lambda: ready(receiver), 30, "the receiver to reach the intake")
        answers = [callback(receiver.url, f"@TGS#_cluster-{n}") for n in range(40)]
        assert [a.status_code for a in answers] == [200] * 40
        wait_for(lambda: len(applied(writer.db)) == 40, 20, "the writer to apply all 40")
        assert sorted(topic_ids(writer.db)) == sorted(f"@TGS#_cluster-{n}" for n in range(40))
        rows = applied(writer.db)
        assert [entry for _, _, _, entry in rows] == list(range(1, 41))  # each message once, in order
        exactly_once(writer.db, [f"@TGS#_cluster-{n}" for n in range(40)])
        assert not (receiver.db.exists()), "a receiver keeps no database"
        verified = run_cli("verify", "--db", str(writer.db))
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        receiver.stop()
        writer.stop()


def test_a_writer_stopped_hands_the_lease_over_at_once_and_exits_0(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    """SIGTERM (systemctl stop or restart): the active writer releases the lease, so a standby takes it
    within its next try rather than once the lease expired (8 s), and exits 0 with its temporary folders
    removed -- not killed by the signal it was stopped with."""
    active = role(tmp_path, nats_cluster, "writer-a", "writer").start()
    standby = role(tmp_path, nats_cluster, "writer-b", "writer")
    try:
        wait_for(lambda: ready(active), 30, "the first writer to hold the lease")
        standby.start()
        wait_for(
            lambda: "standing by" in httpx.get(f"{standby.url}/readyz").text, 30, "the second to stand by"
        )
        assert active.process is not None
        active.process.terminate()
        code = active.process.wait(30)
        took = wait_for(lambda: holds_lease(standby), 10, "the standby to take the lease", interval=0.05)
        print(f"\nthe standby held the lease {took:.2f} s after the first writer exited")
        assert code == 0, active.log.read_text()[-3000:]
        assert took < 3, "the lease was not released: the standby waited for it to expire"
        assert not list(Path(tempfile.gettempdir()).glob(f"topic-audit-*-{active.process.pid}-*"))
        wait_for(lambda: ready(standby), 30, "the standby to be active")
    finally:
        standby.stop()
        active.stop()
