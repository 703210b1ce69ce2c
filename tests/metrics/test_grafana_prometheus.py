"""End to end with a real Prometheus scraping the real service every second: every dashboard expression
returns data, and every alert condition is false while healthy and true once its failure is injected.

Failures are injected for real: bad deliveries (rejections), the database write lock held by another
connection for a little less than the busy timeout (slow answers) and for longer (writes failing, 503),
and the receiver stopped (down). The seconds from injection to the condition turning true are printed.
This is the single-machine mode: the cluster-mode panels have no data here (tests/cluster/
test_cluster_alerts.py runs them), and the cluster-mode alerts stay quiet through every failure.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    APP_ID,
    TOKEN,
    Prometheus,
    Server,
    alter,
    free_port,
    listening_ports,
    require_tool,
    start_on_free_ports,
    wait_for,
)
from destination import Destination
from grafana_files import alert_rules, dashboard_queries, evaluate
from topic_audit.demo import load

pytestmark = pytest.mark.slow

CLUSTER_ALERTS = ("topic-audit-writer-behind", "topic-audit-no-writer")


Stack = tuple[Server, Prometheus, Destination]


@pytest.fixture
def stack(db_path: Path, tmp_path: Path) -> Iterator[Stack]:
    """The receiver forwarding to a real destination (the app's handler) and `topic-audit watch` on its
    log, both scraped by Prometheus."""
    binary = require_tool("prometheus")
    destination = Destination("ok")
    env = {"TOPIC_AUDIT_FORWARD_URL": destination.url, "TOPIC_AUDIT_FORWARD_RETRY_SCHEDULE": "0,1,1"}
    server = Server(db_path, tmp_path / "server.log", env).start()
    watch_log = tmp_path / "watch.log"

    def launch() -> tuple[subprocess.Popen[bytes], set[int]]:
        port = free_port()  # `watch --metrics-port 0` means no metrics: a free port, taken with a retry
        with watch_log.open("ab") as out:
            command = ["watch", "--db", str(db_path), "--interval", "1", "--metrics-port", str(port)]
            return subprocess.Popen(
                [sys.executable, "-m", "topic_audit.cli", *command], stdout=out, stderr=out
            ), {port}

    watcher = start_on_free_ports(launch, watch_log)
    watch_port = listening_ports(watcher.pid).pop()
    prometheus = Prometheus(binary, f"127.0.0.1:{server.port}", tmp_path, f"127.0.0.1:{watch_port}")
    try:
        yield server, prometheus, destination
    finally:
        prometheus.stop()
        watcher.terminate()
        watcher.wait(10)
        server.stop()
        destination.stop()


def traffic(server: Server, seconds: float, mix: str, rate: float = 40, concurrency: int = 8) -> load.Report:
    return load.run_blocking(
        url=f"{server.url}/callback",
        sdk_app_id=APP_ID,
        token=TOKEN,
        rate=rate,
        duration=seconds,
        concurrency=concurrency,
        mix=load.parse_mix(mix),
    )


def hold_write_lock(db: Path, held: float, released: float, until: float) -> threading.Thread:
    """Another process's writer: take the write lock for ``held`` s, let go for ``released`` s, repeat."""

    def run() -> None:
        conn = sqlite3.connect(db, isolation_level=None, timeout=5)
        while time.monotonic() < until:
            conn.execute("BEGIN IMMEDIATE")
            time.sleep(held)
            conn.execute("ROLLBACK")
            time.sleep(released)
        conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_dashboard_and_alerts_against_real_prometheus(stack: Stack, capsys: Any) -> None:
    server, prometheus, destination = stack
    rules = {r["uid"]: r for r in alert_rules()}

    def firing(uid: str) -> bool:
        return evaluate(rules[uid], prometheus.query)

    def fired_after(uid: str, started: float, within: float = 40) -> float:
        """Wait until ``uid`` fires; the seconds since its failure was injected at ``started``."""
        wait_for(lambda: firing(uid), within, f"{uid} to fire", 0.5)
        assert not [uid for uid in CLUSTER_ALERTS if firing(uid)], "a cluster-mode alert fires in single mode"
        return time.monotonic() - started

    # Healthy: good deliveries only.
    report = traffic(server, 6, "good=9,duplicate=1")
    assert report.statuses.keys() == {200}
    wait_for(
        lambda: prometheus.query("sum(topic_audit_log_entries)")[0][1] >= report.sent, 20, "a scrape", 0.5
    )
    # Rates need two scrapes of the new counters: every panel has data within a few scrape intervals.
    queries = dashboard_queries(cluster=False)
    wait_for(lambda: all(prometheus.query(expr) for _, expr in queries), 20, "data in every panel", 0.5)
    for title, expr in queries:
        assert prometheus.query(expr), f"panel {title!r} has no data: {expr}"
    assert {uid for uid in rules if firing(uid)} == set(), "alerts fire on a healthy service"

    timings: dict[str, float] = {}
    # Rejections.
    started = time.monotonic()
    traffic(server, 3, "bad=1", rate=20)
    timings["topic-audit-rejections"] = fired_after("topic-audit-rejections", started)
    assert not firing("topic-audit-audit-writes-failing")

    # Slow answers: the lock is held 0.8 s at a time, inside the 1 s busy timeout, so answers are slow but
    # (nearly all) OK; a request that still finds the lock taken after 1 s is answered 503, never OK.
    started = time.monotonic()
    locker = hold_write_lock(server.db, 0.8, 0.3, started + 6)
    slow = traffic(server, 6, "good=1", rate=20)
    locker.join()
    assert slow.statuses[200] >= 0.9 * slow.sent and set(slow.statuses) <= {200, 503}, slow.statuses
    assert slow.percentile(99) > 0.5
    timings["topic-audit-slow-answers"] = fired_after("topic-audit-slow-answers", started)
    assert not firing("topic-audit-audit-writes-failing")

    # Writes failing: the lock is held past the busy timeout; requests are answered 503, never OK.
    started = time.monotonic()
    # Enough failures that the burn rate clears 14.4x a 99.9% objective with a wide margin (>1.44% failed).
    locker = hold_write_lock(server.db, 5.0, 0.05, started + 5)
    failing = traffic(server, 5, "good=1", rate=40, concurrency=16)
    locker.join()
    assert failing.statuses[503] >= 20, failing.statuses
    timings["topic-audit-audit-writes-failing"] = fired_after("topic-audit-audit-writes-failing", started)
    timings["topic-audit-error-budget-burn"] = fired_after("topic-audit-error-budget-burn", started)
    assert httpx.get(f"{server.url}/readyz").status_code == 200  # recovered by itself

    # The app's handler fails: attempts fail, and with a 3-attempt schedule (0, 1, 1 s) deliveries are
    # exhausted within seconds.
    started = time.monotonic()
    destination.mode = "fail"
    traffic(server, 3, "good=1", rate=10)
    timings["topic-audit-forward-failing"] = fired_after("topic-audit-forward-failing", started)
    timings["topic-audit-forward-exhausted"] = fired_after("topic-audit-forward-exhausted", started)
    assert not firing("topic-audit-forward-backlog")

    # The app's handler hangs: the outbox backs up. Its age is made 10 minutes old by moving the
    # queued_at of the waiting rows back (the outbox is current state, not the log): the alert's
    # 5-minute threshold cannot be waited out in a test.
    destination.mode = "hang"
    traffic(server, 2, "good=1", rate=10)
    started = time.monotonic()
    conn = sqlite3.connect(server.db, timeout=5)
    conn.execute(
        "UPDATE outbox SET queued_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-10 minutes') WHERE state = 'pending'"
    )
    conn.commit()
    conn.close()
    timings["topic-audit-forward-backlog"] = fired_after("topic-audit-forward-backlog", started)

    # The log altered behind its triggers: `topic-audit watch` finds it.
    started = time.monotonic()
    alter(server.db, "UPDATE audit_log SET client_ip = '10.9.9.9' WHERE id = 3")
    timings["topic-audit-integrity-finding"] = fired_after("topic-audit-integrity-finding", started)

    # Receiver down.
    server.stop()
    started = time.monotonic()
    timings["topic-audit-receiver-down"] = fired_after("topic-audit-receiver-down", started)
    for _title, expr in dashboard_queries():
        prometheus.query(expr)  # still valid queries with the target down (the cluster panels' too)
    time.sleep(3)  # a few scrapes of nothing at all
    assert not [uid for uid in CLUSTER_ALERTS if firing(uid)], "a cluster-mode alert fires in single mode"

    with capsys.disabled():
        print("\nseconds from injected failure to alert condition true (Prometheus, 1 s scrapes):")
        for uid, seconds in timings.items():
            print(f"  {uid}: {seconds:.1f}")
    assert all(seconds < 60 for seconds in timings.values()), timings
