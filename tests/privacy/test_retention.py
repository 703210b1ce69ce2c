"""Retention run by ``serve`` (hourly, in small batches, while it answers), the body policy, and the
"Retention behind" alert fired in a real Prometheus."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from benchmarks.logs import generate_log
from conftest import (
    APP_ID,
    TOKEN,
    Post,
    Prometheus,
    Server,
    findings,
    forge,
    holding,
    instances,
    message,
    rebuilt_in_one_go,
    require_tool,
    rows,
    wait_for,
)
from litestar.testing import TestClient
from topic_audit.demo import load
from topic_audit.log import reindex, search
from topic_audit.metrics import Metrics
from topic_audit.privacy import erasure, purge
from topic_audit.privacy.purge import connect
from topic_audit.receiver.app import create_app
from topic_audit.settings import Settings
from topic_audit.tencent import samples
from topic_audit.writer import retention


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


@pytest.mark.parametrize("rebuilding", [False, True], ids=["", "rebuilding-the-indexes"])
def test_serve_runs_retention_while_answering(rebuilding: bool, tmp_path: Path) -> None:
    """Retention in serve under ~200/s; and, with a rebuild of both full-text indexes under way (what a
    purge starts once their structure grew long), the writer carries it through between its groups."""
    db = tmp_path / "audit.db"
    old_log(db, 12_000, 3)  # two thirds older than a day
    if rebuilding:
        conn = connect(db)
        for index in purge.INDEXES:
            assert not reindex.step(conn, index, most_levels=0)
        conn.close()
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
    conn = connect(db)
    try:
        assert {n for (n,) in conn.execute("SELECT name FROM sqlite_master")}.isdisjoint(
            {f"{index}_{part}" for index in purge.INDEXES for part in ("next", "old")}
        )
        search.index_everything(conn)
        for index in purge.INDEXES:
            held = instances(conn, index)
            assert held and held == rebuilt_in_one_go(conn, index)
    finally:
        conn.close()


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


def test_the_policy_in_force_is_reported_before_retention_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention loads once the receiver answers (docs/performance.md, "Cold start"); the retention and
    checkpoint interval in force are in the metrics from the start. Here retention never loads (a
    stand-in for ``_forgetting`` that does nothing)."""

    async def never(*_: Any) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr("topic_audit.receiver.app._forgetting", never)
    settings = Settings(
        sdk_app_id=APP_ID, token=TOKEN, db=tmp_path / "audit.db", retention_days=2, checkpoint_seconds=60
    )
    with TestClient(create_app(settings, Metrics())) as client:
        text = client.get("/metrics").text
    assert "topic_audit_retention_seconds 172800.0" in text
    assert "topic_audit_checkpoint_interval_seconds 60.0" in text


def test_the_oldest_content_is_read_from_where_the_last_read_left_off(post: Post, db_path: Path) -> None:
    for i in range(8):
        post(message(f"user{i}", f"text {i}"))
    conn = connect(db_path)
    erasure.erase(conn, [1, 2, 3, 5], "request", "first", None, "2026-12-02T00:00:00.000Z")
    seen = retention.Counted()
    assert retention.counts(db_path, seen)[0] == {"request": 4}
    assert seen.lowest == 4  # entries 1-3 are not read again
    erasure.erase(conn, [4, 6], "retention", "second", None, "2026-12-02T00:00:01.000Z")
    erased, age = retention.counts(db_path, seen)
    assert seen.lowest == 7 and erased == {"request": 4, "retention": 2} and age > 0
    fresh = retention.counts(db_path)  # as a read from the start finds
    assert fresh[0] == erased and abs(fresh[1] - age) < 5
    erasure.erase(conn, [7, 8], "request", "last", None, "2026-12-02T00:00:02.000Z")
    conn.close()
    assert retention.counts(db_path, seen) == ({"request": 6, "retention": 2}, 0.0)
    assert seen.lowest == 9


def test_the_policy_sweep_moves_past_what_the_policy_wrote_without_content(tmp_path: Path) -> None:
    """Every callback outside the topic family is written without its content: a round finds nothing
    to erase, and the next round starts after what this one read instead of reading it again."""
    db = tmp_path / "audit.db"
    settings = Settings(sdk_app_id=APP_ID, token=TOKEN, db=db, store_bodies="topics")
    with TestClient(create_app(settings, Metrics())) as client:
        for i in range(5):
            body = message(f"user{i}", "x") if i != 2 else samples.sample("after-create")
            query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
            assert client.post(f"/callback?{query}", json=body).status_code == 200
        on = retention.OnTheWriter(client.app.state.writer, lambda: "2026-12-02T00:00:00.000Z")
        assert asyncio.run(on.sweep(db, 0)) == 5
        assert asyncio.run(on.sweep(db, 5)) == 5


def test_retention_in_serve_keeps_an_entry_changed_since_it_was_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "audit.db"
    with TestClient(create_app(Settings(sdk_app_id=APP_ID, token=TOKEN, db=db), Metrics())) as client:
        for i in range(4):
            body = message(f"user{i}", f"text {i}")
            query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
            assert client.post(f"/callback?{query}", json=body).status_code == 200
        forge(db, "UPDATE audit_log SET detail = 'edited' WHERE id = 3")
        on = retention.OnTheWriter(client.app.state.writer, lambda: "2026-12-02T00:00:00.000Z")
        retention.log.addHandler(caplog.handler)  # the package's loggers do not propagate
        try:
            assert asyncio.run(on.retain(db, 0)) == 3
        finally:
            retention.log.removeHandler(caplog.handler)
    assert [r["id"] for r in rows(db) if r["request_body"] is not None] == [3]
    assert "entry 3 has content that does not match its commitment: not erasing it" in caplog.text
