"""The README stays true: settings, commands, metrics, and the auditor's script all checked."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import Post
from topic_audit import cli
from topic_audit.metrics import Metrics
from topic_audit.settings import PREFIX, Settings

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
    from topic_audit.integrity.watch import WatchMetrics

    names = {m.name for m in Metrics().registry.collect()} | {
        m.name for m in WatchMetrics().registry.collect()
    }
    table = README.split("## Metrics", 1)[1].split("##", 1)[0]
    documented = set(re.findall(r"^\| `(topic_audit_[a-z_]+)`", table, re.MULTILINE))
    # prometheus_client reports counters without their _total suffix
    # (and a gauge that mirrors a count kept in the database keeps the counter's name: erased entries)
    assert {n.removesuffix("_total") for n in documented} == {n.removesuffix("_total") for n in names}


def test_the_auditors_script_verifies_a_real_log(post: Post, settings: Settings, tmp_path: Path) -> None:
    from topic_audit.tencent import samples

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


def test_the_auditors_checkpoint_script(post: Post, settings: Settings, tmp_path: Path) -> None:
    from topic_audit import clock
    from topic_audit.tencent import samples
    from topic_audit.transparency.checkpoints import Signer, make_checkpoint
    from topic_audit.writer.thread import connect

    signer, _ = Signer.load_or_create(tmp_path / "key.pem")
    file = tmp_path / "audit.db.checkpoints.jsonl"
    for name in ("after-create", "info-changed", "destroyed"):
        post(samples.sample(name))
        conn = connect(settings.db)
        make_checkpoint(conn, signer, file, clock.iso(0))
        conn.close()
    (tmp_path / "checkpoint-public-key.hex").write_text(signer.public_key_hex)
    script = README.split("### Signed checkpoints", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    script = script.replace('"file:audit.db', f'"file:{settings.db}')
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=30
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "3 checkpoints verified; the log is intact up to entry 3"
    # and it fails once the tail is cut off
    conn = sqlite3.connect(settings.db)
    conn.execute("DROP TRIGGER audit_log_no_delete")
    conn.execute("DELETE FROM audit_log WHERE id = 3")
    conn.commit()
    conn.close()
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=30
    )
    assert run.returncode != 0 and "lost entries" in run.stderr
