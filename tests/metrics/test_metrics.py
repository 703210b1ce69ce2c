"""Metrics: bounded, pre-created, promtool-clean, and in agreement with the log."""

from __future__ import annotations

import subprocess
from typing import Any

from conftest import APP_ID, Post, require_tool, rows
from litestar.testing import TestClient
from topic_audit import metrics as metrics_module
from topic_audit.metrics import Metrics
from topic_audit.settings import Settings
from topic_audit.tencent import models, samples


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    assert found is not None, f"{name}{labels} does not exist"
    return found


def test_every_label_combination_exists_at_start(client: TestClient[Any], metrics: Metrics) -> None:
    for command in metrics_module.COMMAND_LABELS:
        for outcome, reason in metrics_module.OUTCOME_REASONS:
            name = "topic_audit_callbacks_total"
            assert value(metrics, name, command=command, outcome=outcome, reason=reason) == 0
        assert value(metrics, "topic_audit_callback_duration_seconds_count", command=command) == 0
    for state in ("active", "deleted"):
        assert value(metrics, "topic_audit_topics", state=state) == 0
    assert value(metrics, "topic_audit_audit_append_errors_total") == 0
    assert value(metrics, "topic_audit_build_info", version=metrics_module.package_version()) == 1


def test_counts_agree_with_the_log(
    post: Post, client: TestClient[Any], metrics: Metrics, settings: Settings
) -> None:
    for name in (
        "after-create",
        "after-create",
        "info-changed",
        "destroyed",
        "group-created",
        "before-create",
    ):
        post(samples.sample(name))
    post(b"{", models.AFTER_CREATE)
    post(samples.sample("after-create"), query=samples.query(APP_ID, models.AFTER_CREATE, "bad-token"))
    client.get("/callback")
    logged = rows(settings.db)
    for outcome in ("accepted", "duplicate", "ignored", "rejected", "error"):
        in_log = sum(1 for r in logged if r["outcome"] == outcome)
        counted = sum(
            value(metrics, "topic_audit_callbacks_total", command=c, outcome=outcome, reason=r)
            for c in metrics_module.COMMAND_LABELS
            for o, r in metrics_module.OUTCOME_REASONS
            if o == outcome
        )
        assert counted == in_log, outcome
    assert value(metrics, "topic_audit_log_entries") == len(logged)
    assert value(metrics, "topic_audit_topics", state="deleted") == 1
    assert value(metrics, "topic_audit_last_accepted_timestamp_seconds") > 0
    assert (
        value(
            metrics,
            "topic_audit_callbacks_total",
            command="other",
            outcome="rejected",
            reason="method_not_allowed",
        )
        == 1
    )
    assert value(metrics, "topic_audit_callback_duration_seconds_count", command=models.AFTER_CREATE) == 4


def test_http_metrics_use_route_templates(client: TestClient[Any]) -> None:
    client.get("/healthz")
    client.get("/no/such/path/12345")
    text = client.get("/metrics").text
    assert 'topic_audit_http_requests_total{app_name="topic-audit",method="GET",path="/healthz"' in text
    assert "12345" not in text  # unhandled paths never become label values


def test_promtool_finds_nothing_to_complain_about(post: Post, client: TestClient[Any]) -> None:
    promtool = require_tool("promtool")
    post(samples.sample("after-create"))
    exposition = client.get("/metrics").content
    result = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result
