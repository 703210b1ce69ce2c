"""Reading the Grafana files: every PromQL expression in them, and a small evaluator of alert conditions
(reduce ``last``, ``threshold``, ``math``) as Grafana applies them to instant query results."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

GRAFANA = Path(__file__).resolve().parent.parent / "grafana"
DATASOURCE_UID = "topic-audit-prometheus"
# What Grafana substitutes before a query reaches Prometheus (1 s scrapes in the tests).
CLUSTER_ROW = "Cluster mode"
"""How the title of the dashboard's row of cluster-mode panels begins."""
GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$__interval": "5s", "$__range": "5m"}


def dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboards" / "topic-audit.json").read_text())


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "alerting" / "topic-audit.yaml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def substitute(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def cluster_panels() -> set[int]:
    """The ids of the panels under the cluster-mode row (their metrics exist only in cluster mode)."""
    found: set[int] = set()
    inside = False
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            inside = panel["title"].startswith(CLUSTER_ROW)
        elif inside:
            found.add(panel["id"])
    return found


def dashboard_queries(cluster: bool | None = None) -> list[tuple[str, str]]:
    """(panel title, expression) for every target of every panel; with ``cluster``, of the cluster-mode
    panels only (True) or of every other one (False)."""
    chosen = cluster_panels()
    return [
        (p["title"], substitute(t["expr"]))
        for p in dashboard()["panels"]
        for t in p.get("targets", [])
        if cluster is None or (p["id"] in chosen) == cluster
    ]


def alert_queries() -> list[tuple[str, str]]:
    return [
        (rule["title"], substitute(d["model"]["expr"]))
        for rule in alert_rules()
        for d in rule["data"]
        if d["datasourceUid"] != "__expr__"
    ]


def evaluate(rule: dict[str, Any], query: Any) -> bool:
    """Whether ``rule`` fires for any series, given ``query(expr) -> list of (labels, value)``."""
    results: dict[str, list[tuple[dict[str, str], float]]] = {}
    for d in rule["data"]:
        model = d["model"]
        if d["datasourceUid"] != "__expr__":
            results[d["refId"]] = query(substitute(model["expr"]))
        elif model["type"] == "reduce":
            results[d["refId"]] = [(labels, v) for labels, v in results[model["expression"]] if v == v]
        elif model["type"] == "threshold":
            [condition] = model["conditions"]
            op, (limit, *_) = condition["evaluator"]["type"], condition["evaluator"]["params"]
            fired = [v > limit if op == "gt" else v < limit for _, v in results[model["expression"]]]
            results[d["refId"]] = [
                (labels, float(f)) for (labels, _), f in zip(results[model["expression"]], fired, strict=True)
            ]
        elif model["type"] == "math":
            results[d["refId"]] = [({}, _math(model["expression"], results))]
        else:
            raise AssertionError(f"unsupported expression type {model['type']}")
    return any(v > 0 for _, v in results[rule["condition"]])


def _math(expression: str, results: dict[str, list[tuple[dict[str, str], float]]]) -> float:
    def single(ref: str) -> str:
        values = [v for _, v in results[ref]]
        return repr(values[0]) if values else "float('nan')"

    python = re.sub(r"\$([A-Z])", lambda m: single(m.group(1)), expression)
    python = python.replace("&&", " and ").replace("||", " or ")
    if not re.fullmatch(r"[0-9.eE+\- ()<>=!andornfltacs'_]*", python):
        raise AssertionError(f"unsupported math expression {expression!r}")
    return float(bool(eval(python, {"__builtins__": {"float": float}})))
