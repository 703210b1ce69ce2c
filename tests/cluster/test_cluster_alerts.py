"""Cluster mode's alerts and dashboard against a real Prometheus scraping every role each second (receivers
as job ``topic-audit``, writers as ``topic-audit-writer``, as docs/observability.md says), with the
alert rules of grafana/ evaluated as Grafana does (tests/grafana_files.py), their ``for`` included:

- under ~200 callbacks a second, every cluster panel has data and no cluster alert fires;
- the active writer stopped (SIGSTOP) for 60 s: answers go on (all 200), "Writer behind" fires although
  the writer's own /metrics cannot be scraped; continued (SIGCONT), it catches up (every callback answered
  200 applied exactly once) and the alert resolves; idle traffic fires nothing;
- the only writer killed (-9): "No writer" fires;
- single-machine mode, busy, idle and stopped: neither fires.

The figures (seconds to fire and to resolve, answers failed, the lag's peak) are printed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import APP_ID, TOKEN, Prometheus, Server, require_tool, wait_for
from grafana_files import alert_queries, alert_rules, dashboard_queries, evaluate
from processes import NatsCluster, applied, exactly_once, needs_nats, ready, role, topic_ids
from processes import nats_cluster_fixture as nats_cluster_fixture
from topic_audit.tencent import samples

pytestmark = [needs_nats, pytest.mark.slow]

log = logging.getLogger(__name__)

BEHIND, NO_WRITER = "topic-audit-writer-behind", "topic-audit-no-writer"
STOPPED_SECONDS = 60
LEASE_SECONDS = "300"
"""Long enough that the writer continued still holds its lease and carries on: renewed every quarter of
it, it can be 75 s old when the writer stops, and a renewal that times out while the writer reconnects
(the servers dropped it as a slow consumer) is tried again a quarter later. With a shorter one, the
standby takes over, and the writer continued exits 75 (started again, it stands by)."""
BEHIND_EXPR = next(expr for title, expr in alert_queries() if title == "Writer behind")
"""The receivers' last acknowledged publish less the last message applied, in seconds."""
LEASE_EXPR = next(expr for _, expr in dashboard_queries(cluster=True) if "by (writer)" in expr)


class Traffic:
    """Signed callbacks at ``rate`` a second from ``threads`` threads to ``url`` until stopped; every answer's
    status (0 for none) and time."""

    def __init__(self, url: str, prefix: str, rate: float = 200, threads: int = 16) -> None:
        self.url, self.prefix, self.interval = url, prefix, threads / rate
        self.answers: list[tuple[str, int, float]] = []
        """(topic, status, seconds)"""
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, worker: int) -> None:
        due = time.monotonic() + worker * self.interval / len(self._threads)
        with httpx.Client(timeout=10) as client:
            n = 0
            while not self._stop.is_set():
                time.sleep(max(0.0, due - time.monotonic()))
                due += self.interval
                n += 1
                topic = f"@TGS#_{self.prefix}@TOPIC#_{worker}x{n}"
                body = samples.sample("after-create", TopicId=topic)
                query = samples.query(APP_ID, body["CallbackCommand"], TOKEN)
                started = time.monotonic()
                try:
                    status = client.post(f"{self.url}/callback?{query}", content=json.dumps(body)).status_code
                except httpx.HTTPError:
                    status = 0
                self.answers.append((topic, status, time.monotonic() - started))  # list.append: atomic

    def stop(self) -> Traffic:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)
        return self

    @property
    def ok(self) -> list[str]:
        return [topic for topic, status, _ in self.answers if status == 200]

    @property
    def failed(self) -> int:
        return sum(status != 200 for _, status, _ in self.answers)


def for_seconds(rule: dict[str, Any]) -> float:
    """A rule's ``for`` (``0s``, ``30s``, ``1m``) in seconds."""
    text = rule["for"]
    return float(text[:-1]) * (60 if text.endswith("m") else 1)


class Alert:
    """One rule, evaluated on each :meth:`poll`: when its condition turned true (and stayed true) and
    when that lasted its ``for``: fired, as Grafana would (less its evaluation interval)."""

    def __init__(self, uid: str, prometheus: Prometheus) -> None:
        self.rule = next(r for r in alert_rules() if r["uid"] == uid)
        self.prometheus = prometheus
        self.true_since: float | None = None

    def condition(self) -> bool:
        return evaluate(self.rule, self.prometheus.query)

    def poll(self) -> bool:
        """Whether the rule fires now."""
        if not self.condition():
            self.true_since = None
            return False
        self.true_since = self.true_since or time.monotonic()
        return time.monotonic() - self.true_since >= for_seconds(self.rule)


def scrape_writers(prometheus: Prometheus, folder: Path, writers: list[Server]) -> None:
    """Add the writers to Prometheus's configuration, as their own job, and reload it."""
    config = folder / "prometheus.yml"
    targets = ", ".join(f"'127.0.0.1:{w.port}'" for w in writers)
    config.write_text(
        config.read_text()
        + f"  - job_name: topic-audit-writer\n    static_configs: [{{targets: [{targets}]}}]\n"
    )
    prometheus.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: len(prometheus.query('up{job="topic-audit-writer"} == 1')) == len(writers),
        60,
        "Prometheus to scrape the writers",
        0.5,
    )


def value(prometheus: Prometheus, expr: str) -> float | None:
    found = prometheus.query(expr)
    return found[0][1] if found else None


@pytest.fixture
def prometheus_binary() -> str:
    return require_tool("prometheus")


@pytest.fixture
def stopped() -> Iterator[list[int]]:
    """Pids a test stopped (SIGSTOP): continued whatever happens (also by the test before it stops its
    processes), so that they can end."""
    pids: list[int] = []
    yield pids
    continue_all(pids)


def continue_all(pids: list[int]) -> None:
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    pids.clear()


def stop(server: Server, stopped: list[int]) -> None:
    """SIGSTOP ``server``'s process and every process it started (single-machine mode's receivers
    answer /metrics, not the supervisor), the parent first so that it starts nothing new."""
    assert server.process is not None
    family = [server.process.pid]
    for pid in family:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                family += [int(child) for child in (task / "children").read_text().split()]
    for pid in family:
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)


def test_writer_behind_and_no_writer_in_cluster_mode(
    tmp_path: Path, nats_cluster: NatsCluster, prometheus_binary: str, stopped: list[int], capsys: Any
) -> None:
    env = {"TOPIC_AUDIT_LEASE_SECONDS": LEASE_SECONDS}
    writer = role(tmp_path, nats_cluster, "writer-a", "writer", **env).start()
    started: list[Server] = [writer]
    prometheus: Prometheus | None = None
    traffic: Traffic | None = None
    figures: dict[str, float] = {}
    try:
        wait_for(lambda: ready(writer), 60, "writer-a to hold the lease")
        standby = role(tmp_path, nats_cluster, "writer-b", "writer", **env).start()
        receiver = role(tmp_path, nats_cluster, "receiver-1", "receiver").start()
        started += [standby, receiver]
        wait_for(lambda: ready(receiver), 60, "the receiver to reach the intake")
        folder = tmp_path / "prometheus"
        folder.mkdir()
        prometheus = Prometheus(prometheus_binary, f"127.0.0.1:{receiver.port}", folder)
        scrape_writers(prometheus, folder, [writer, standby])
        behind, no_writer = Alert(BEHIND, prometheus), Alert(NO_WRITER, prometheus)
        rules = alert_rules()

        # Healthy, busy: every cluster panel has data, the lease panel names both writers, nothing fires.
        traffic = Traffic(receiver.url, "busy")
        queries = dashboard_queries(cluster=True)
        wait_for(
            lambda: all(prometheus.query(expr) for _, expr in queries), 60, "data in every cluster panel", 1
        )
        holders = {labels["writer"]: v for labels, v in prometheus.query(LEASE_EXPR)}
        assert sorted(holders.values()) == [0.0, 1.0], holders  # the active writer and the standby
        healthy_behind = 0.0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert not behind.poll() and not no_writer.poll()
            healthy_behind = max(healthy_behind, value(prometheus, BEHIND_EXPR) or 0.0)
            time.sleep(0.5)
        figures["healthy: receivers' last publish - last applied, max (s)"] = healthy_behind
        others = [r["title"] for r in rules if evaluate(r, prometheus.query)]
        log.info("alerts true while healthy and busy: %s", others)
        assert BEHIND not in others and NO_WRITER not in others
        before_stop = len(traffic.answers)

        # The writer stopped for 60 s under load.
        stop(writer, stopped)
        stop_at = time.monotonic()
        fired: dict[str, float] = {}
        peak_behind = 0.0
        while time.monotonic() - stop_at < STOPPED_SECONDS:
            for name, alert in (("Writer behind", behind), ("No writer", no_writer)):
                if name not in fired and alert.poll():
                    fired[name] = time.monotonic() - stop_at
            peak_behind = max(peak_behind, value(prometheus, BEHIND_EXPR) or 0.0)
            time.sleep(0.5)
        assert "Writer behind" in fired, f"Writer behind did not fire in {STOPPED_SECONDS} s: {fired}"
        continue_all(stopped)
        continued_at = time.monotonic()
        during = traffic.answers[before_stop:]
        figures["stopped: callbacks answered"] = len(during)
        figures["stopped: answers not 200"] = sum(status != 200 for _, status, _ in during)
        figures["stopped: slowest answer (s)"] = max(seconds for _, _, seconds in during)
        figures["stopped: seconds to Writer behind firing"] = fired["Writer behind"]
        figures["stopped: seconds to No writer firing (for included)"] = fired.get("No writer", float("nan"))
        figures["stopped: receivers' last publish - last applied, peak (s)"] = peak_behind

        # Continued: the writer catches up, the alert resolves; then the traffic stops.
        wait_for(lambda: not behind.condition(), 120, "Writer behind to resolve", 0.5)
        figures["continued: seconds to Writer behind resolving"] = time.monotonic() - continued_at
        wait_for(lambda: ready(writer), 120, "writer-a to catch up")
        figures["continued: seconds to caught up (/readyz)"] = time.monotonic() - continued_at
        traffic.stop()
        answered = traffic.ok
        figures["total: callbacks answered 200"] = len(answered)
        figures["total: answers not 200"] = traffic.failed
        assert traffic.failed == 0, f"{traffic.failed} of {len(traffic.answers)} callbacks not answered 200"
        try:
            wait_for(lambda: len(applied(writer.db)) >= len(answered), 120, "every callback applied", 0.5)
        except AssertionError as exc:
            missing = set(answered) - set(topic_ids(writer.db))
            why = httpx.get(f"{writer.url}/readyz", timeout=5).text
            raise AssertionError(
                f"{exc}: {len(missing)} missing, e.g. {sorted(missing)[:3]}; {why}"
            ) from None
        time.sleep(2)  # anything more would arrive now
        rows = applied(writer.db)
        msg_ids = [msg_id for _, _, msg_id, _ in rows]
        assert len(rows) == len(answered) == len(set(msg_ids)), (len(rows), len(answered), len(set(msg_ids)))
        exactly_once(writer.db, answered)  # each once in the log, each stream applied without a gap
        assert len(topic_ids(writer.db)) == len(answered)
        wait_for(
            lambda: (value(prometheus, "max(max_over_time(topic_audit_intake_lag_messages[5m]))") or 0) > 0,
            30,
            "the writer's lag after it continued, scraped",
            1,
        )
        figures["continued: writer's intake lag, peak (messages)"] = value(
            prometheus, "max(max_over_time(topic_audit_intake_lag_messages[5m]))"
        ) or float("nan")
        figures["continued: writer's intake lag, peak (s)"] = value(
            prometheus, "max(max_over_time(topic_audit_intake_lag_seconds[5m]))"
        ) or float("nan")

        # Idle: nothing is published, nothing fires (15 evaluations against 1 s scrapes).
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert not behind.poll(), "Writer behind fires on idle traffic"
            assert not no_writer.poll()
            time.sleep(1)

        # The only writer killed: "No writer" fires (and idle, "Writer behind" does not).
        process = standby.process
        assert process is not None
        process.terminate()
        terminated = time.monotonic()
        try:
            process.wait(60)
            figures["standby: seconds to stop on SIGTERM"] = time.monotonic() - terminated
        except subprocess.TimeoutExpired:
            figures["standby: seconds to stop on SIGTERM"] = float("inf")
            log.warning("the standby did not stop within 60 s of SIGTERM: killed")
            process.kill()
            process.wait(10)
        wait_for(lambda: len(prometheus.query("topic_audit_writer_lease")) == 1, 30, "the standby gone", 0.5)
        assert writer.process is not None
        writer.process.send_signal(signal.SIGKILL)
        writer.process.wait(10)
        killed_at = time.monotonic()
        wait_for(lambda: no_writer.poll() or behind.poll(), 120, "No writer to fire", 0.5)
        assert not behind.condition(), "Writer behind fires with idle traffic"
        figures["killed: seconds to No writer firing (for included)"] = time.monotonic() - killed_at
        figures["killed: seconds to No writer condition true"] = (
            no_writer.true_since or killed_at
        ) - killed_at
        for _, expr in dashboard_queries():
            prometheus.query(expr)  # every panel's query is still valid with the writers gone
    finally:
        continue_all(stopped)
        if traffic is not None:
            traffic.stop()
        if prometheus is not None:
            prometheus.stop()
        for server in reversed(started):
            server.stop()
        with capsys.disabled():
            print(
                "\ncluster alerts (Prometheus, 1 s scrapes; Grafana adds up to its 10 s evaluation interval):"
            )
            for name, figure in figures.items():
                print(f"  {name}: {figure:.1f}")
        log.info("cluster alert figures: %s", figures)


def test_the_cluster_alerts_stay_quiet_in_single_machine_mode(
    server: Server, tmp_path: Path, prometheus_binary: str, stopped: list[int]
) -> None:
    """Busy, idle, then stopped (no scrape at all): single-machine mode has no cluster metrics to fire on."""
    prometheus = Prometheus(prometheus_binary, f"127.0.0.1:{server.port}", tmp_path)
    alerts = [Alert(BEHIND, prometheus), Alert(NO_WRITER, prometheus)]

    def quiet_for(seconds: float, also: Callable[[], None] = lambda: None) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert not [a.rule["title"] for a in alerts if a.condition()]
            also()
            time.sleep(0.5)

    try:
        traffic = Traffic(server.url, "single", rate=100, threads=8)
        wait_for(lambda: prometheus.query("topic_audit_log_entries > 100"), 60, "a scrape of a busy log", 0.5)
        quiet_for(5)
        assert len(traffic.stop().ok) == len(traffic.answers)
        quiet_for(5)
        stop(server, stopped)
        wait_for(lambda: prometheus.query('up{job="topic-audit"} == 0'), 30, "a failed scrape", 0.5)
        quiet_for(10)
    finally:
        continue_all(stopped)
        prometheus.stop()
