"""The auditors' and operators' commands on the database: explore, verify, checkpoints, keys, migrations."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from topic_audit import clock
from topic_audit.cli.options import (
    CONTEXT,
    checkpoint_file_option,
    db_option,
    origin_options,
    pinned_key,
    signing_key_option,
)
from topic_audit.cli.options import log_origin as origin_named
from topic_audit.log.database import TOOL_TIMEOUT_SECONDS, connect, read_only
from topic_audit.settings import Settings


@click.command(context_settings=CONTEXT)
@click.option(
    "--host",
    envvar="TOPIC_AUDIT_EXPLORE_HOST",
    default="127.0.0.1",
    show_default=True,
    show_envvar=True,
    help="Address to bind Datasette to. Any address but loopback requires TOPIC_AUDIT_AUDITOR_PASSWORD_HASH "
    "and/or TOPIC_AUDIT_API_TOKEN: anonymous users are then refused.",
)
@click.option(
    "--port",
    envvar="TOPIC_AUDIT_EXPLORE_PORT",
    default=8001,
    type=int,
    show_default=True,
    show_envvar=True,
    help="Port to bind Datasette to.",
)
@click.option(
    "--allowed-host",
    "allowed_host",
    multiple=True,
    envvar="TOPIC_AUDIT_EXPLORE_ALLOWED_HOSTS",
    show_envvar=True,
    help="A Host name Datasette answers (name: any port; name:port: that port only); repeat it, or "
    "space-separate in the variable. Any other Host is answered 400 (DNS rebinding). Required when --host "
    "is not loopback. [default: localhost 127.0.0.1 [::1]]",
)
@db_option
def explore(host: str, port: int, allowed_host: tuple[str, ...], db: Path) -> None:
    """Serve the audit database read-only in Datasette, as `audit`, for auditors."""
    import asyncio

    import uvicorn

    from topic_audit.auditor.explore import AccessError, HostCheck, allowed_hosts, make_datasette
    from topic_audit.log import migrations

    try:
        allowed = allowed_hosts(host, allowed_host)
        migrations.migrate(db)
        ds = make_datasette(db, host)
    except AccessError as exc:
        raise click.UsageError(str(exc)) from None
    asyncio.run(ds.invoke_startup())
    click.echo(
        f"Datasette on http://{host}:{port}/audit (read-only view of {db}; Host: {' '.join(allowed)})",
        err=True,
    )
    uvicorn.run(HostCheck(ds.app(), allowed), host=host, port=port, log_level="warning")


@click.command("hash-password", context_settings=CONTEXT)
@click.password_option(
    envvar="TOPIC_AUDIT_AUDITOR_PASSWORD",
    show_envvar=True,
    help="The auditor's password (prompted for, never echoed).",
)
def hash_password(password: str) -> None:
    """Print the hash to put in TOPIC_AUDIT_AUDITOR_PASSWORD_HASH (Datasette login for user `auditor`)."""
    from datasette_auth_passwords.utils import hash_password as _hash

    click.echo(_hash(password))


@click.command(context_settings=CONTEXT)
@db_option
def migrate(db: Path) -> None:
    """Create the database or bring its schema up to date."""
    from topic_audit.log import migrations  # sqlite-utils: not loaded by the other commands

    migrations.migrate(db)
    click.echo(f"{db}: schema up to date")


@click.command("rebuild-projection", context_settings=CONTEXT)
@db_option
def rebuild_projection(db: Path) -> None:
    """Rebuild the topics table from the audit log in one transaction.

    The log is replayed on every core first, outside any lock; then, in one short transaction, the
    topics that differ from the replay are rewritten. Readers keep seeing the old table until it
    commits; a running receiver waits only for that transaction.
    """
    from topic_audit.log import rebuild

    if not db.exists():
        raise click.ClickException(f"{db} does not exist")
    conn = connect(db, timeout=TOOL_TIMEOUT_SECONDS)
    try:
        started = time.perf_counter()
        with click.progressbar(length=1, label="replaying", file=sys.stderr) as bar:

            def progress(reached: int, high: int) -> None:
                bar.length = max(high, 1)
                bar.update(reached - bar.pos)

            rebuilt = rebuild.rebuild(conn, progress)
    finally:
        conn.close()
    click.echo(
        f"rebuilt {rebuilt.topics} topics from {db} in {time.perf_counter() - started:.2f} s: "
        f"{rebuilt.written} differed from the log and were rewritten; "
        f"the write lock was held {rebuilt.locked:.2f} s"
    )


@click.command(context_settings=CONTEXT)
@db_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    envvar="TOPIC_AUDIT_VERIFY_JSON",
    show_envvar=True,
    help="Print the result as one JSON object (for automation).",
)
@checkpoint_file_option
@click.option(
    "--public-key",
    envvar="TOPIC_AUDIT_PUBLIC_KEY",
    show_envvar=True,
    help="Pin the checkpoint signer: raw hex or a PEM file (from `topic-audit public-key`). Without it "
    "the key of the first checkpoint is trusted.",
)
def verify(db: Path, as_json: bool, checkpoint_file: Path | None, public_key: str | None) -> None:
    """Check the audit log: contiguous ids, body hashes, the hash chain, every signed checkpoint, and
    the projection.

    Exits 1 when anything is found, naming the first bad entry of each kind.
    """
    file = Settings(db=db, checkpoint_file=checkpoint_file).checkpoint_path
    pinned = pinned_key(public_key)
    from topic_audit.integrity.verify import first_bad_id, verify_all

    if not db.exists():
        raise click.ClickException(f"{db} does not exist")
    conn = read_only(db)
    started = time.perf_counter()
    try:
        total = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
        findings, count, head = verify_all(conn, file, pinned, not as_json and total >= 100000)
    finally:
        conn.close()
    seconds = time.perf_counter() - started
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": not findings,
                    "entries": count,
                    "head": head,
                    "first_bad_id": first_bad_id(findings),
                    "seconds": round(seconds, 3),
                    "findings": [f.as_dict() for f in findings],
                }
            )
        )
    else:
        for f in findings:
            where = f"entry {f.entry_id}" if f.entry_id is not None else "log"
            topic = f" topic {f.topic_id}" if f.topic_id else ""
            click.echo(f"FAIL {f.check}: {where}{topic}: {f.message}")
        click.echo(f"{'OK' if not findings else 'FAILED'}: {count} entries, head {head}, {seconds:.2f} s")
    if findings:
        sys.exit(1)


@click.command(context_settings=CONTEXT)
@db_option
@checkpoint_file_option
@signing_key_option
@origin_options
def checkpoint(
    db: Path,
    checkpoint_file: Path | None,
    signing_key: Path | None,
    log_origin: str | None,
    sdkappid: str | None,
) -> None:
    """Sign a checkpoint of the log now (the receiver also does so every --checkpoint-seconds).

    The checkpoint also signs the log's Merkle tree as a C2SP checkpoint note (origin from --log-origin
    or --sdkappid; without either, the latest note's). The first one after an upgrade stores the tree.
    Everything added since the last checkpoint is verified first: when anything does not verify, nothing
    is signed and the command exits 1 with the findings.
    """
    from topic_audit.log.database import private
    from topic_audit.settings import SettingsError
    from topic_audit.transparency.checkpoints import Signer
    from topic_audit.writer.signer import Refused
    from topic_audit.writer.signer import checkpoint as sign_checkpoint
    from topic_audit.writer.thread import connect

    settings = Settings(db=db, checkpoint_file=checkpoint_file, signing_key=signing_key)
    if not db.exists():
        raise click.ClickException(f"{db} does not exist")
    private(db, settings.checkpoint_path)  # folder 0700, files 0600, umask 077
    try:
        signer, created = Signer.load_or_create(settings.signing_key_path)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    if created:
        click.echo(
            f"created signing key {settings.signing_key_path} (0600); export its public key with "
            "`topic-audit public-key`",
            err=True,
        )
    from topic_audit.log import migrations  # sqlite-utils: not loaded by the other commands

    migrations.migrate(db)
    conn = connect(db)
    try:
        origin = origin_named(log_origin, sdkappid)
        cp = sign_checkpoint(conn, signer, settings.checkpoint_path, clock.now(), origin=origin)
    except Refused as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        conn.close()
    click.echo(
        f"checkpoint: {cp['log_size']} entries, head {cp['head_hash']}, digest {cp['digest']} "
        f"-> {settings.checkpoint_path}"
    )


@click.command("public-key", context_settings=CONTEXT)
@db_option
@signing_key_option
@click.option(
    "--hex",
    "as_hex",
    is_flag=True,
    envvar="TOPIC_AUDIT_PUBLIC_KEY_HEX",
    show_envvar=True,
    help="Print the raw key in hex instead of PEM.",
)
@click.option(
    "--vkey",
    "as_vkey",
    is_flag=True,
    envvar="TOPIC_AUDIT_PUBLIC_KEY_VKEY",
    show_envvar=True,
    help="Print the signed-note verifier key <origin>+<key id>+<key> (for check-receipt and tlog tools).",
)
@origin_options
def public_key(
    db: Path,
    signing_key: Path | None,
    as_hex: bool,
    as_vkey: bool,
    log_origin: str | None,
    sdkappid: str | None,
) -> None:
    """Print the checkpoint signer's public key, for auditors to pin with `verify --public-key`."""
    from topic_audit.transparency.checkpoints import Signer, latest_origin
    from topic_audit.transparency.note import Verifier, raw_public_key

    path = Settings(db=db, signing_key=signing_key).signing_key_path
    if not path.exists():
        raise click.ClickException(f"no signing key at {path}; `topic-audit checkpoint` creates one")
    try:
        signer, _ = Signer.load_or_create(path)
    except ValueError as exc:  # a key others may read (SettingsError), or not an Ed25519 key
        raise click.ClickException(str(exc)) from None
    if as_vkey:
        origin = origin_named(log_origin, sdkappid) or (latest_origin(db) if db.exists() else None)
        if origin is None:
            raise click.UsageError("the vkey names the log's origin: give --log-origin or --sdkappid")
        click.echo(Verifier.for_key(origin, raw_public_key(signer.key)).vkey)
        return
    click.echo(signer.public_key_hex if as_hex else signer.public_key_pem().rstrip())
