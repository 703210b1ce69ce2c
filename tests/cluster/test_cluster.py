"""Cluster mode end to end: a callback answered by a receiver is applied once by the writer."""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli, wait_for
from processes import NatsCluster, applied, callback, exactly_once, needs_nats, ready, role, topic_ids
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
