"""The ``topic-audit`` command line (click). Every option has help text and an environment variable.

Click only: each command parses its options into :class:`topic_audit.settings.Settings` (or plain
values) and calls the package that does the work. The commands group as the modules do:
:mod:`.serve` (``serve``: the receiver and its processes), :mod:`.units` (``units``: the systemd unit
files), :mod:`.send` (``send``: callbacks for trying it), :mod:`.audit` (what reads or maintains the
database: ``explore``, ``hash-password``, ``migrate``, ``rebuild-projection``, ``verify``, ``checkpoint``,
``public-key``), :mod:`.forward` (``replay``, ``rebuild-outbox``, and the demo handler ``sink``),
:mod:`.offbox` (``restore`` from the replica, ``watch`` a log continuously), :mod:`.proofs` (``prove``,
``check-receipt``), :mod:`.privacy` (``erase``, ``retain``); :mod:`.options` holds what they share.
"""

from __future__ import annotations

import click

from topic_audit.cli import audit, forward, offbox, privacy, proofs, send, serve, units
from topic_audit.cli.options import CONTEXT


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="topic-audit")
def main() -> None:
    """topic-audit: the audited webhook target for Tencent Cloud Chat topic callbacks."""


main.add_command(serve.serve)
main.add_command(units.units)
main.add_command(send.send)
for command in (
    audit.explore,
    audit.hash_password,
    audit.migrate,
    audit.rebuild_projection,
    audit.verify,
    audit.checkpoint,
    audit.public_key,
    forward.replay,
    forward.rebuild_outbox,
    forward.sink,
    offbox.restore,
    offbox.watch,
    proofs.prove,
    proofs.check_receipt,
    privacy.erase,
    privacy.retain,
):
    main.add_command(command)
