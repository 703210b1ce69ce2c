"""Forwarding in cluster mode: a receiver relays a Before-callback to the app's handler and answers with
its veto, as in single-machine mode; the active writer delivers the After-callbacks it applied."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
from conftest import APP_ID, TOKEN, wait_for
from destination import VETO, Destination
from processes import NatsCluster, applied, needs_nats, ready, role
from processes import nats_cluster_fixture as nats_cluster_fixture
from topic_audit.tencent import samples

pytestmark = needs_nats


def deliver(url: str, name: str) -> httpx.Response:
    body = samples.sample(name)
    query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
    return httpx.post(f"{url}/callback?{query}", content=json.dumps(body).encode(), timeout=10)


def deliveries(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT audit_id, kind, status_code, error FROM deliveries")]
    finally:
        conn.close()


def test_before_callbacks_are_relayed_and_after_callbacks_delivered(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    app = Destination("veto")
    forward = {"TOPIC_AUDIT_FORWARD_URL": app.url}
    writer = role(tmp_path, nats_cluster, "writer-a", "writer", **forward).start()
    receiver = role(tmp_path, nats_cluster, "receiver-1", "receiver", **forward).start()
    try:
        wait_for(lambda: ready(writer) and ready(receiver), 30, "the writer and the receiver")
        vetoed = deliver(receiver.url, "before-create")
        assert (vetoed.status_code, vetoed.content) == (200, VETO)  # the app's answer, byte for byte
        app.mode = "ok"
        assert deliver(receiver.url, "after-create").status_code == 200
        wait_for(lambda: len(applied(writer.db)) == 2, 30, "the writer to apply both")
        wait_for(lambda: app.ids() == {2}, 30, "the writer to deliver the After-callback")
        wait_for(lambda: len(deliveries(writer.db)) == 2, 30, "the writer to record the delivery")
        kinds = sorted((d["audit_id"], d["kind"], d["status_code"]) for d in deliveries(writer.db))
        assert kinds == [(1, "before", 200), (2, "after", 200)]
        assert len(app.received) == 2, "each callback reached the app once"
    finally:
        receiver.stop()
        writer.stop()
        app.stop()
