"""`topic-audit units`: the systemd unit files that ship in the package, written where they are wanted."""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

import click

from topic_audit.cli.options import CONTEXT

UNITS = ("topic-audit.socket", "topic-audit.service")
PACKAGED_COMMAND = "/usr/local/bin/topic-audit"
"""The command the packaged service names; written as the path of this installation's command."""


def this_command() -> str:
    """This installation's ``topic-audit`` (beside the running Python, else on PATH, else the default)."""
    beside = Path(sys.executable).with_name("topic-audit")
    if beside.is_file():
        return str(beside)
    return shutil.which("topic-audit") or PACKAGED_COMMAND


@click.command(context_settings=CONTEXT)
@click.option(
    "--to",
    "folder",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TOPIC_AUDIT_UNITS_DIR",
    show_envvar=True,
    help="Folder to write topic-audit.socket and topic-audit.service to (e.g. /etc/systemd/system).",
)
def units(folder: Path) -> None:
    """Write the systemd units: a socket-activated, hardened service running as its own user.

    The service runs this installation's topic-audit (its path is written into ExecStart). docs/operations.md,
    "Running in production", says how to install, reload, upgrade and roll back.
    """
    folder.mkdir(parents=True, exist_ok=True)
    command = this_command()
    for name in UNITS:
        text = (resources.files("topic_audit.units") / name).read_text(encoding="utf-8")
        (folder / name).write_text(text.replace(PACKAGED_COMMAND, command), encoding="utf-8")
        click.echo(str(folder / name))
