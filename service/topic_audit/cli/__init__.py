"""The ``topic-audit`` command line (click). Every option has help text and an environment variable.

The commands group as the modules do: :mod:`.serve` (the receiver), :mod:`.send` (callbacks for
trying it), :mod:`.audit` (everything that reads or maintains the database), :mod:`.forward` (replaying
deliveries to the app's handler, and a demo handler), :mod:`.offbox` (restoring from the replica, and
watching a log continuously).
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
