"""Structural checks of every Grafana file: it parses, uids are unique, datasources match the provisioned
one, alert rule refIds are consistent, and every PromQL expression parses (promtool)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from conftest import require_tool
from grafana_files import (
    CLUSTER_ROW,
    DATASOURCE_UID,
    GRAFANA,
    alert_queries,
    alert_rules,
    cluster_panels,
    dashboard,
    dashboard_queries,
)


def test_every_file_parses() -> None:
    files = sorted(
        p
        for p in GRAFANA.rglob("*")
        if p.is_file() and p.name != "__init__.py" and "__pycache__" not in p.parts
    )
    assert {p.suffix for p in files} <= {".json", ".yaml", ".yml"}
    for path in files:
        assert yaml.safe_load(path.read_text()) is not None, path  # YAML is a superset of JSON


def test_the_datasource_has_the_fixed_uid() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    [datasource] = doc["datasources"]
    assert (datasource["uid"], datasource["type"]) == (DATASOURCE_UID, "prometheus")


def test_the_dashboard() -> None:
    board = dashboard()
    assert board["uid"] == "topic-audit"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert any("forwarding" in title.lower() for title in rows)
    assert sum(title.startswith(CLUSTER_ROW) for title in rows) == 1
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        assert panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for needed in ("outcome", "reason", "latency", "append", "entries", "topics"):
        assert needed in titles
    cluster = " ".join(p["title"] for p in board["panels"] if p["id"] in cluster_panels()).lower()
    for needed in ("lag (messages)", "lag (seconds)", "publish latency", "publish errors", "lease"):
        assert needed in cluster, needed
    cluster_exprs = " ".join(expr for _, expr in dashboard_queries(cluster=True))
    for metric in (
        "topic_audit_intake_lag_messages",
        "topic_audit_intake_lag_seconds",
        "topic_audit_intake_publish_seconds_bucket",
        "topic_audit_intake_publish_errors_total",
        "topic_audit_writer_lease",
    ):
        assert metric in cluster_exprs, metric
    assert "histogram_quantile(0.5," in cluster_exprs and "histogram_quantile(0.99," in cluster_exprs
    assert "by (stream)" in cluster_exprs and "by (writer)" in cluster_exprs
    links = [link["url"] for link in board["links"]] + [
        link["url"] for p in board["panels"] for link in p.get("links", [])
    ]
    assert any("/audit/audit_log?outcome=rejected" in url for url in links)
    assert all(url.startswith("${datasette}/audit/") for url in links)
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "topic-audit.yaml").read_text())
    assert provider["providers"][0]["options"]["path"].endswith("topic-audit")


def test_alert_rules_are_consistent() -> None:
    rules = alert_rules()
    uids = [r["uid"] for r in rules]
    assert len(uids) == len(set(uids))
    for rule in rules:
        refs = [d["refId"] for d in rule["data"]]
        assert len(refs) == len(set(refs)), rule["uid"]
        assert rule["condition"] in refs, rule["uid"]
        assert rule["annotations"]["summary"], rule["uid"]
        assert rule["noDataState"] in {"OK", "NoData", "Alerting"}
        for d in rule["data"]:
            assert d["refId"] == d["model"]["refId"]
            if d["datasourceUid"] == "__expr__":
                model = d["model"]
                used = model.get("expression", "")
                assert any(f"${r}" in used or used == r for r in refs if r != d["refId"]), rule["uid"]
            else:
                assert d["datasourceUid"] == DATASOURCE_UID
    by_uid = {r["uid"]: r for r in rules}
    assert by_uid["topic-audit-receiver-down"]["noDataState"] == "Alerting"  # no scrape is down
    for title in (
        "rejected",
        "internal errors",
        "writes failing",
        "down",
        "timeout",
        "budget",
        "to the app failing",
        "backed up",
        "exhausted",
        "integrity finding",
        "replica behind",
        "checkpoints not signed",
        "writer behind",
        "no writer",
    ):
        assert any(title in r["title"].lower() for r in rules), title


def test_the_cluster_alerts_see_nothing_without_cluster_metrics() -> None:
    """Single-machine mode exports the intake gauges at 0 and no lease series: each cluster expression
    keeps only values a cluster role sets (> 0, or a lease series), so that it returns nothing there and
    nothing is OK (the real Prometheus tests show it, this keeps the pieces from being dropped)."""
    by_uid = {r["uid"]: r for r in alert_rules()}
    for uid in ("topic-audit-writer-behind", "topic-audit-no-writer"):
        rule = by_uid[uid]
        assert rule["noDataState"] == "OK", uid
        [query] = [d["model"]["expr"] for d in rule["data"] if d["datasourceUid"] != "__expr__"]
        assert "timestamp_seconds" in query and "> 0)" in " ".join(query.split()), uid
        assert "severity" in rule["labels"] and rule["annotations"]["description"], uid
    assert by_uid["topic-audit-no-writer"]["for"] != "0s"  # a failover (the lease's TTL) is not an alert


def test_every_expression_parses(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    expressions = dashboard_queries() + alert_queries()
    rules = {
        "groups": [
            {
                "name": "parse-check",
                "rules": [{"record": f"check:expr{i}", "expr": e} for i, (_, e) in enumerate(expressions)],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in result.stdout
