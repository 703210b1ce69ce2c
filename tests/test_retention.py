"""Retention run by ``serve`` (hourly, in small batches, while it answers), the body policy, and the
"Retention behind" alert fired in a real Prometheus."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from benchmarks.logs import generate_log
from conftest import APP_ID, TOKEN, Server, require_tool, rows, wait_for
from test_erasure import findings, holding, message
from topic_audit import load, samples


def kept_and_erased(db: Path) -> tuple[int, int]:
    conn = sqlite3.connect(db)
    try:
        total = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
        erased = conn.execute("SELECT count(*) FROM erased_entries").fetchone()[0]
    finally:
        conn.close()
    return total - erased, erased


def old_log(db: Path, entries: int, days: float) -> None:
    """A log whose entries were received evenly over the last ``days`` days."""
    generate_log(db, entries, seed=11, span_days=days)


def test_serve_runs_retention_while_answering(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    old_log(db, 12_000, 3)  # two thirds older than a day
    server = Server(db, tmp_path / "server.log", {"TOPIC_AUDIT_RETENTION_DAYS": "1"}).start()
    try:
        report: list[load.Report] = []
        sender = threading.Thread(
            target=lambda: report.append(
                load.run_blocking(
                    url=f"{server.url}/callback",
                    sdk_app_id=APP_ID,
                    token=TOKEN,
                    rate=200,
                    duration=20,
                    concurrency=4,
                    mix=load.parse_mix("good=1"),
                )
            )
        )
        sender.start()
        wait_for(lambda: kept_and_erased(db)[1] >= 7_900, 60, "the first retention run")
        sender.join()
        wait_for(
            lambda: "retention: erased the content of" in server.log.read_text(), 60, "the run to finish"
        )
    finally:
        server.stop()
    sent = report[0]
    print(f"\nretention under ~200/s: {sent.summary()}")
    assert sent.statuses.keys() == {200}, sent.statuses  # no answer failed while it ran
    assert sent.percentile(99) < 2.0
    kept, erased = kept_and_erased(db)
    assert 7_900 <= erased <= 8_100 and kept >= sent.sent
    assert findings(db) == []


def test_store_bodies_topics_keeps_evidence_of_other_callbacks(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    server = Server(db, tmp_path / "server.log", {"TOPIC_AUDIT_STORE_BODIES": "topics"}).start()
    try:
        text = "qzxv policy never stored"
        for body in (message("alice_policy", text), samples.sample("after-create")):
            query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
            answer = httpx.post(f"{server.url}/callback?{query}", content=json.dumps(body), timeout=5)
            assert answer.status_code == 200
    finally:
        server.stop()
    stored = rows(db)
    assert stored[0]["request_body"] is None and stored[0]["query_string"] == ""
    assert (
        stored[0]["callback_command"] == "Group.CallbackAfterSendMsg" and stored[0]["request_body_bytes"] > 0
    )
    assert stored[1]["request_body"] is not None  # the topic family keeps its content
    conn = sqlite3.connect(db)
    causes = conn.execute("SELECT cause, entries FROM erasures").fetchall()
    conn.close()
    assert causes == [("policy", 1)]
    assert holding(db, b"alice_policy") == [] and holding(db, b"qzxv") == []
    assert findings(db) == []


def test_retention_behind_fires_in_prometheus(tmp_path: Path) -> None:
    from grafana_files import alert_rules, evaluate
    from test_grafana_prometheus import Prometheus

    binary = require_tool("prometheus")
    db = tmp_path / "audit.db"
    old_log(db, 2_000, 3)  # content three days old, retention one day: behind until the first run
    server = Server(db, tmp_path / "server.log", {"TOPIC_AUDIT_RETENTION_DAYS": "1"}).start()
    prometheus = Prometheus(binary, f"127.0.0.1:{server.port}", tmp_path)
    rule = next(r for r in alert_rules() if r["uid"] == "topic-audit-retention-behind")
    try:
        started = time.monotonic()
        wait_for(lambda: evaluate(rule, prometheus.query), 30, "Retention behind to fire")
        fired = time.monotonic() - started
        wait_for(lambda: not evaluate(rule, prometheus.query), 60, "Retention behind to resolve")
        resolved = time.monotonic() - started
        age: list[tuple[dict[str, Any], float]] = prometheus.query(
            "max(topic_audit_oldest_content_age_seconds)"
        )
    finally:
        prometheus.stop()
        server.stop()
    print(f"\nRetention behind fired after {fired:.1f} s and resolved after {resolved:.1f} s")
    assert age[0][1] < 86400
