"""The transparency log's commands: ``prove`` (a receipt, or consistency) and ``check-receipt`` (offline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

import click

from topic_audit.cli.options import CONTEXT, db_option, origin_options
from topic_audit.cli.options import log_origin as origin_named
from topic_audit.log.database import read_only


@click.command(context_settings=CONTEXT)
@db_option
@click.option(
    "--id",
    "entry_id",
    type=int,
    envvar="TOPIC_AUDIT_PROVE_ID",
    show_envvar=True,
    help="The audit_log id of the entry to prove (its receipt).",
)
@click.option(
    "--size",
    type=int,
    envvar="TOPIC_AUDIT_PROVE_SIZE",
    show_envvar=True,
    help="Prove against the signed checkpoint of this many entries. [default: the latest checkpoint]",
)
@click.option(
    "--consistency",
    nargs=2,
    type=int,
    envvar="TOPIC_AUDIT_PROVE_CONSISTENCY",
    show_envvar=True,
    help="OLD NEW: prove that the checkpoint of NEW entries extends the one of OLD entries.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "tlog-proof"]),
    default="json",
    show_default=True,
    envvar="TOPIC_AUDIT_PROVE_FORMAT",
    show_envvar=True,
    help="A receipt as JSON, or as C2SP tlog-proof@v1 text (for .tlog-proof tooling).",
)
def prove(
    db: Path, entry_id: int | None, size: int | None, consistency: tuple[int, int] | None, fmt: str
) -> None:
    """Print an entry's receipt (its inclusion proof under a signed checkpoint), or a consistency proof.

    A receipt can be handed on and checked offline with `topic-audit check-receipt` or docs/log-format.md's
    script, against the log's public key alone.
    """
    from topic_audit.transparency import receipts

    if (entry_id is None) == (not consistency):
        raise click.UsageError("give --id N (a receipt) or --consistency OLD NEW")
    if not db.exists():
        raise click.ClickException(f"{db} does not exist")
    conn = read_only(db)
    try:
        if consistency:
            click.echo(json.dumps(receipts.consistency(conn, *consistency), indent=2))
            return
        assert entry_id is not None
        receipt = receipts.receipt(conn, entry_id, size)
    except receipts.ProofError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        conn.close()
    click.echo(
        receipts.to_tlog_proof(receipt) if fmt == "tlog-proof" else json.dumps(receipt, indent=2),
        nl=fmt == "json",
    )


@click.command("check-receipt", context_settings=CONTEXT)
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option(
    "--public-key",
    envvar="TOPIC_AUDIT_PUBLIC_KEY",
    show_envvar=True,
    required=True,
    help="The log's key: raw hex, a PEM file (`topic-audit public-key`) or the vkey (`public-key --vkey`).",
)
@origin_options
@click.option(
    "--entry-hash",
    envvar="TOPIC_AUDIT_ENTRY_HASH",
    show_envvar=True,
    help="Also require the receipt to be for this entry_hash (hex; the one you recomputed from the entry).",
)
def check_receipt(
    file: TextIO,
    public_key: str,
    log_origin: str | None,
    sdkappid: str | None,
    entry_hash: str | None,
) -> None:
    """Check a receipt (or a consistency proof from `prove --consistency`) offline, without the database.

    FILE is the receipt, JSON or tlog-proof text (`-` reads standard input). Exits 1 with one line
    saying what does not hold: a malformed receipt, another key, another origin, or a proof that does
    not verify.
    """
    from topic_audit.transparency import note, offline

    text = Path(public_key).read_text() if Path(public_key).is_file() else public_key
    try:
        key = offline.load_key(text)
    except (ValueError, note.NoteError) as exc:
        raise click.BadParameter(f"not a public key: {exc}", param_hint="--public-key") from None
    try:
        click.echo(offline.check(file.read(), key, origin_named(log_origin, sdkappid), entry_hash))
    except offline.ReceiptError as exc:
        raise click.ClickException(str(exc)) from None
