"""`topic-audit units`: the systemd unit files that ship in the package, written where they are wanted."""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

import click

from topic_audit.cli.options import CONTEXT

UNITS = ("topic-audit.socket", "topic-audit.service")
"""Single-machine mode: one socket-activated ``serve``."""
ROLE_UNITS = {
    "receiver": ("topic-audit-receiver.socket", "topic-audit-receiver.service"),
    "writer": ("topic-audit-writer.service",),
}
"""Cluster mode (docs/cluster.md): each role's units, named for it, so that one machine can run both."""
PACKAGED_COMMAND = "/usr/local/bin/topic-audit"
"""The command the packaged services name; written as the path of this installation's command."""


def this_command() -> str:
    """This installation's ``topic-audit`` (beside the running Python, else on PATH, else the default)."""
    beside = Path(sys.executable).with_name("topic-audit")
    if beside.is_file():
        return str(beside)
    return shutil.which("topic-audit") or PACKAGED_COMMAND


def names(roles: tuple[str, ...]) -> list[str]:
    """The units to write: the single-machine ones without a role, else each role's, in the order given."""
    if not roles:
        return list(UNITS)
    return [name for role in dict.fromkeys(roles) for name in ROLE_UNITS[role]]


@click.command(context_settings=CONTEXT)
@click.option(
    "--to",
    "folder",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TOPIC_AUDIT_UNITS_DIR",
    show_envvar=True,
    help="Folder to write the units to (e.g. /etc/systemd/system).",
)
@click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(sorted(ROLE_UNITS)),
    envvar="TOPIC_AUDIT_UNITS_ROLE",
    show_envvar=True,
    help="Cluster mode (docs/cluster.md): this role's units instead of the single-machine ones: receiver "
    "(topic-audit-receiver.socket and .service) or writer (topic-audit-writer.service, started again after "
    "exit 75, as a standby); repeat for a machine that runs both. [default: single-machine mode: "
    "topic-audit.socket and topic-audit.service]",
)
def units(folder: Path, roles: tuple[str, ...]) -> None:
    """Write the systemd units: hardened services running as their own user, their paths printed.

    Without --role, single-machine mode: a socket-activated topic-audit.service (docs/operations.md,
    "Running in production", says how to install, reload, upgrade and roll back). With --role, cluster
    mode's: a socket-activated receiver (settings in /etc/topic-audit/receiver.env) and a writer
    (/etc/topic-audit/writer.env) that systemd starts again when it lost the lease; docs/cluster.md,
    "Running the roles under systemd". Every service runs this installation's topic-audit (its path is
    written into ExecStart).
    """
    folder.mkdir(parents=True, exist_ok=True)
    command = this_command()
    for name in names(roles):
        text = (resources.files("topic_audit.units") / name).read_text(encoding="utf-8")
        (folder / name).write_text(text.replace(PACKAGED_COMMAND, command), encoding="utf-8")
        click.echo(str(folder / name))
