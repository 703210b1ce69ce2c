"""The layout holds: every dotted name the code, the dashboard and the Grafana files mention exists, the
processes ``serve`` spawns by module name can be started, and logger names stay what operators grep for
and alerts cite, wherever their modules move."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys

import pytest
from conftest import ROOT

SERVICE = ROOT / "service" / "topic_audit"
DOTTED = re.compile(r"topic_audit(?:\.[A-Za-z_]\w*)+")
NOT_NAMES = {"topic_audit.head", "topic_audit.intake.a", "topic_audit.intake.b"}
"""Dotted strings that name no module: the ASGI scope extension that carries a request's head, and the
NATS subjects of cluster mode's intake streams."""

LOGGERS = {
    "topic_audit",
    "topic_audit.checkpoints",
    "topic_audit.cluster",
    "topic_audit.database",
    "topic_audit.deliverer",
    "topic_audit.delivery",
    "topic_audit.forward",
    "topic_audit.housekeeping",
    "topic_audit.litestream",
    "topic_audit.replica",
    "topic_audit.retention",
    "topic_audit.serve",
    "topic_audit.settings",
    "topic_audit.watch",
    "topic_audit.writer",
}
"""Every logger's name, pinned: they were the modules' names once, and log searches and the alerts'
descriptions (``topic_audit.retention``, ``topic_audit.litestream``) name them."""


def _loggers() -> set[str]:
    names = set()
    for path in SERVICE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "getLogger":
                assert node.args and isinstance(node.args[0], ast.Constant), (
                    f"{path}: a logger named by a literal"
                )
                names.add(node.args[0].value)
    return names


def test_logger_names_are_pinned() -> None:
    assert _loggers() == LOGGERS


def test_the_alerts_name_loggers_that_exist() -> None:
    text = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "grafana").rglob("*.y*ml"))
    assert set(DOTTED.findall(text)) <= LOGGERS


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(target, attr):
                return False
            target = getattr(target, attr)
        return True
    return False


def _mentions() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    files = [
        *SERVICE.rglob("*.py"),
        *(ROOT / "dashboard").rglob("*.html"),
        *(ROOT / "dashboard").rglob("*.yml"),
    ]
    for path in files:
        for name in DOTTED.findall(path.read_text(encoding="utf-8")):
            found.setdefault(name.rstrip("."), set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_dotted_name_mentioned_exists() -> None:
    """Docstrings, comments and templates cite modules by their dotted names: a move that left one behind
    fails here (logger names are not modules)."""
    missing = {
        name: where
        for name, where in _mentions().items()
        if name not in LOGGERS | NOT_NAMES and not _resolves(name)
    }
    assert not missing, missing


@pytest.mark.parametrize(
    "module",
    [
        "topic_audit.serve.receiver_process",
        "topic_audit.serve.writer_process",
        "topic_audit.serve.delivery_process",
    ],
)
def test_the_processes_serve_spawns_are_named_in_its_code(module: str) -> None:
    """``serve`` starts its children as ``python -m <module>``: each name is in the code that spawns it,
    and the module has the ``main`` that ``-m`` runs."""
    assert any(f'"{module}"' in p.read_text(encoding="utf-8") for p in SERVICE.rglob("*.py")), module
    ran = subprocess.run(
        [sys.executable, "-c", f"import {module} as m; assert callable(m.main)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr


def test_each_subpackage_says_what_holds_in_it() -> None:
    for init in SERVICE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc) > 40, init
