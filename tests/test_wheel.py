"""The wheel works on its own: built from the tree, installed into a fresh virtual environment, and run
from a directory outside the tree: ``--version``, ``migrate``, ``serve``, ``send``, ``explore`` (with the
templates and metadata it ships) and the Grafana files as package data.

The fresh environment takes its dependencies from this test run's environment (a ``.pth`` line naming
its site-packages: plain paths, none of that environment's ``.pth`` hooks, so not its editable install
of topic_audit), to stay fast and offline; topic_audit itself comes only from the wheel."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
from conftest import APP_ID, ROOT, TOKEN, listening_port, wait_for

pytestmark = pytest.mark.slow


def _wait(url: str) -> None:
    wait_for(lambda: httpx.get(url, timeout=1).status_code == 200, 30, url, interval=0.2)


def test_the_wheel_installed_elsewhere(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building leaves build/ and *.egg-info behind
    for folder in ("service", "dashboard", "grafana"):
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / file, source / file)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("topic_audit-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    purelib = next(venv.glob("lib/python3*/site-packages"))
    (purelib / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {
        "TOPIC_AUDIT_DB": str(elsewhere / "audit.db"),
        "TOPIC_AUDIT_SDKAPPID": APP_ID,
        "TOPIC_AUDIT_TOKEN": TOKEN,
        "TOPIC_AUDIT_PORT": "0",  # the OS picks the ports; read from the processes once they listen
        "TOPIC_AUDIT_EXPLORE_PORT": "0",
    }
    tool = str(venv / "bin/topic-audit")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool, *args], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=60
        )

    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import topic_audit; print(topic_audit.__file__)"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        check=True,
    ).stdout
    assert where.startswith(str(purelib)), where  # the wheel's copy, not the source tree
    assert run("--version").stdout.startswith("topic-audit, version ")
    assert run("migrate").returncode == 0
    grafana = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "from importlib import resources; g = resources.files('topic_audit.grafana'); "
            "print((g / 'dashboards' / 'topic-audit.json').is_file(), "
            "(g / 'provisioning' / 'alerting' / 'topic-audit.yaml').is_file())",
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        check=True,
    ).stdout
    assert grafana.split() == ["True", "True"]

    logs = [elsewhere / "serve.log", elsewhere / "explore.log"]
    processes = []
    for command, log in zip(("serve", "explore"), logs, strict=True):
        with log.open("wb") as out:
            processes.append(
                subprocess.Popen(
                    [tool, command], cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT
                )
            )
    try:
        port, explore_port = (listening_port(p, log) for p, log in zip(processes, logs, strict=True))
        _wait(f"http://127.0.0.1:{port}/healthz")
        sent = run("send", "--url", f"http://127.0.0.1:{port}/callback")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert sent.stdout.count("200 Group.Callback") == 4
        _wait(f"http://127.0.0.1:{explore_port}/-/versions.json")
        page = httpx.get(f"http://127.0.0.1:{explore_port}/audit/audit_log", timeout=10)
        assert page.status_code == 200
        assert 'details class="column-help"' in page.text  # the template shipped in the wheel
        assert page.text.count("Group.CallbackAfterCreateTopic") >= 1
        listed = httpx.get(f"http://127.0.0.1:{explore_port}/audit/audit_log.json?_shape=array", timeout=10)
        assert len(listed.json()) == 4
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=15)


def test_every_subpackage_is_in_the_wheel() -> None:
    """pyproject lists its packages (two data packages live outside the source root, so setuptools cannot
    find them): a new subpackage not listed would be missing from the wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    service = ROOT / "service"
    on_disk = {
        ".".join(init.parent.relative_to(service).parts)
        for init in service.glob("topic_audit/**/__init__.py")
    }
    assert on_disk <= listed, on_disk - listed
