"""The README stays true: settings, commands, metrics, and the auditor's script all checked."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import Post

from service import cli
from service.metrics import Metrics
from service.settings import PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_two_commands_come_first() -> None:
    head = README[:400]
    assert "make run" in head and "make test" in head


def test_every_setting_is_documented() -> None:
    for f in fields(Settings):
        name = PREFIX + f.name.upper().replace("SDK_APP_ID", "SDKAPPID")
        assert f"`{name}`" in README, name


def _all_commands() -> list[click.Command]:
    return list(cli.main.commands.values())


@pytest.mark.parametrize("command", _all_commands(), ids=lambda c: c.name)
def test_every_command_and_option_is_documented(command: click.Command) -> None:
    assert f"`topic-audit {command.name}`" in README
    assert command.help, command.name
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, f"{command.name} {param.opts}"
            assert param.envvar, f"{command.name} {param.opts} has no environment variable"
            assert f"`{param.envvar}`" in README, param.envvar


@pytest.mark.parametrize("command", ["--help", *[f"{c.name} --help" for c in _all_commands()]])
def test_help_runs(command: str) -> None:
    result = CliRunner().invoke(cli.main, command.split())
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_every_metric_is_in_the_metrics_table() -> None:
    names = {m.name for m in Metrics().registry.collect()}
    table = README.split("## Metrics", 1)[1].split("##", 1)[0]
    documented = set(re.findall(r"^\| `(topic_audit_[a-z_]+)`", table, re.MULTILINE))
    # prometheus_client reports counters without their _total suffix
    assert {n.removesuffix("_total") for n in documented} == names


def test_the_auditors_script_verifies_a_real_log(post: Post, settings: Settings, tmp_path: Path) -> None:
    from service import samples

    for name in ("after-create", "info-changed", "destroyed", "group-created"):
        post(samples.sample(name))
    post(b"\xff\xfe not utf-8", "Group.CallbackAfterCreateTopic")
    script = README.split("### Canonical form", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    result = subprocess.run(
        [sys.executable, "-c", script.replace('"file:audit.db', f'"file:{settings.db}')],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("5 entries intact")
