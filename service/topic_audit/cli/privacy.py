"""``erase`` and ``retain``: forgetting the content of log entries on purpose, with a record of it."""

from __future__ import annotations

import os
import sqlite3
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click

from topic_audit import clock
from topic_audit.cli.options import CONTEXT, db_option, signing_key_option
from topic_audit.log.database import read_only
from topic_audit.settings import Settings, SettingsError

if TYPE_CHECKING:  # loaded by these commands only, not by every other one (serve starts sooner)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from topic_audit.privacy import erasure

_SELECTORS = (
    (
        "account",
        "USERID",
        "every entry whose body holds this account in any *_Account field (a body that is not JSON: "
        "anywhere as a JSON string)",
    ),
    (
        "ip",
        "ADDR",
        "every entry whose ClientIP (the end user's address), or whose query string anywhere, holds this",
    ),
    (
        "topic",
        "TOPICID",
        "every entry naming this topic (its events, destroys that list it, bodies that name it; a body "
        "that is not JSON: anywhere as a JSON string)",
    ),
    ("id", "N", "the entry with this id"),
)


def _selector_key(signing_key: Path | None, db: Path) -> bytes:
    """The key of the selectors' digests, derived from the checkpoint signing key (kept off the
    database's disk): the database alone cannot confirm whose data a record erased."""
    from topic_audit.privacy import erasure
    from topic_audit.transparency.checkpoints import Signer

    path = Settings(db=db, signing_key=signing_key).signing_key_path
    if not path.exists():
        raise click.ClickException(f"the checkpoint signing key {path} does not exist (--signing-key)")
    try:
        signer, _ = Signer.load_or_create(path)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    return erasure.selector_key(signer.key)


def _record_key(signing_key: Path | None, db: Path) -> Ed25519PrivateKey:
    """The key that signs the erasure records (the checkpoint signing key): required, since a record
    without the log's signature is, to the signer and to ``verify``, one the database alone could have
    minted -- and records cannot be removed again."""
    from topic_audit.transparency.checkpoints import record_key

    path = Settings(db=db, signing_key=signing_key).signing_key_path
    try:
        key = record_key(path, create=False)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    if key is None:
        raise click.ClickException(
            f"the checkpoint signing key {path} does not exist (--signing-key): erasure records are signed "
            "with it"
        )
    return key


def _open(db: Path) -> sqlite3.Connection:
    from topic_audit.log import migrations
    from topic_audit.privacy import purge

    if not db.exists():
        raise click.ClickException(f"{db} does not exist")
    migrations.migrate(db)
    return purge.connect(db)


def _read_only(db: Path) -> sqlite3.Connection:
    """A dry run's connection: the file opened read-only (``mode=ro``), neither migrated nor written. A
    log not yet migrated to erasures has erased nothing: empty stand-ins for the tables the selection
    reads live in the connection's own temporary schema."""
    if not db.exists():
        raise click.ClickException(f"{db} does not exist")
    conn = read_only(db)
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'erased_entries'").fetchone() is None:
        conn.execute("CREATE TEMP TABLE erased_entries (entry_id INTEGER PRIMARY KEY)")
        conn.execute("CREATE TEMP TABLE content_keys (entry_id INTEGER PRIMARY KEY, salt BLOB)")
    return conn


def _report(outcome: erasure.Outcome, what: str, dry_run: bool, ids: list[int], db: Path) -> None:
    if dry_run:
        shown = ", ".join(map(str, ids[:20])) + (" …" if len(ids) > 20 else "")
        click.echo(
            f"dry run (database opened read-only, nothing written): would erase {len(ids)} entries"
            f"{f' ({shown})' if ids else ''}; --yes to erase"
        )
        return
    for record in outcome.records:
        click.echo(
            f"erasure {record.id}: {record.entries} entries ({record.first_id}..{record.last_id}), "
            f"record {record.entry_hash}"
        )
    _purge_status(f"erased {outcome.entries} entries ({what})", outcome, db)
    if outcome.entries and os.environ.get("TOPIC_AUDIT_REPLICA_URL"):
        from topic_audit.offbox.replica import KEEPS_ERASED_SECONDS

        until = datetime.now(UTC) + timedelta(seconds=KEEPS_ERASED_SECONDS)
        click.echo(
            f"the off-box replica keeps older snapshots holding these values until {until:%Y-%m-%dT%H:%MZ} at the "
            "latest (Litestream's snapshot retention); backups of the database keep them as long as they are kept"
        )
    if outcome.entries and _applies_an_intake(db):
        from topic_audit.cluster.scrub import EVERY_SECONDS

        click.echo(
            "cluster mode: the intake streams still hold these callbacks; the active writer deletes them "
            f"(JetStream overwrites each) within {EVERY_SECONDS:.0f} s of the replica holding this erasure "
            "(topic_audit_intake_erased_messages_total counts them); each NATS server's raft log keeps a copy "
            "until it compacts, within minutes (docs: Cluster)"
        )


def _applies_an_intake(db: Path) -> bool:
    """Whether this log is a cluster-mode writer's (it has applied intake messages)."""
    conn = _read_only(db)
    try:
        return conn.execute("SELECT 1 FROM cluster_intake LIMIT 1").fetchone() is not None
    except sqlite3.OperationalError:  # a log from before cluster mode
        return False
    finally:
        conn.close()


def _purge_status(done: str, outcome: erasure.Outcome, db: Path) -> None:
    """Say "no copy remains" only once every place named holds none (:func:`purge.copies_left`)."""
    from topic_audit.privacy import purge

    left = purge.copies_left(db, outcome.purged, outcome.erased_at)
    if not left:
        click.echo(
            f"{done}; no copy remains in the database files ({db.name}, {db.name}-wal) or Litestream's "
            f"local folder ({purge.litestream_folder(db).name})"
        )
        return
    click.echo(
        f"{done}; NOT YET PURGED: " + "; ".join(left) + ". Run the same command again later (with serve "
        "replicating, stop serve first to purge the WAL now; see docs: Privacy)"
    )


@click.command(context_settings=CONTEXT)
@db_option
@signing_key_option
@click.option("--account", envvar="TOPIC_AUDIT_ERASE_ACCOUNT", show_envvar=True, help=_SELECTORS[0][2] + ".")
@click.option("--ip", envvar="TOPIC_AUDIT_ERASE_IP", show_envvar=True, help=_SELECTORS[1][2] + ".")
@click.option("--topic", envvar="TOPIC_AUDIT_ERASE_TOPIC", show_envvar=True, help=_SELECTORS[2][2] + ".")
@click.option(
    "--id",
    "entry_id",
    type=int,
    envvar="TOPIC_AUDIT_ERASE_ID",
    show_envvar=True,
    help="The entry with this id.",
)
@click.option(
    "--from-id",
    type=int,
    envvar="TOPIC_AUDIT_ERASE_FROM_ID",
    show_envvar=True,
    help="Entries from this id (with --to-id).",
)
@click.option(
    "--to-id",
    type=int,
    envvar="TOPIC_AUDIT_ERASE_TO_ID",
    show_envvar=True,
    help="Entries up to this id (with --from-id).",
)
@click.option(
    "--reason",
    envvar="TOPIC_AUDIT_ERASE_REASON",
    show_envvar=True,
    help="Why (recorded in erasures): required.",
)
@click.option(
    "--yes",
    is_flag=True,
    envvar="TOPIC_AUDIT_ERASE_YES",
    show_envvar=True,
    help="Erase; without it, a dry run.",
)
def erase(
    db: Path,
    signing_key: Path | None,
    account: str | None,
    ip: str | None,
    topic: str | None,
    entry_id: int | None,
    from_id: int | None,
    to_id: int | None,
    reason: str | None,
    yes: bool,
) -> None:
    """Erase the content of the entries one selector picks (a data subject's request): bodies, query
    strings, headers, answers and everything copied from them, keeping the evidence (ids, times, outcome)
    and a chained record in `erasures`. Safe while `serve` runs. Returns once no copy remains in the
    database files. Nothing matched: exit 0 with "0 entries"."""
    from topic_audit.privacy import erasure, subjects

    chosen = [
        (kind, str(value))
        for kind, value in (("account", account), ("ip", ip), ("topic", topic), ("id", entry_id))
        if value is not None
    ]
    if from_id is not None or to_id is not None:
        if from_id is None or to_id is None or from_id > to_id:
            raise click.UsageError("--from-id and --to-id go together, FROM <= TO")
        chosen.append(("range", f"{from_id}-{to_id}"))
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --account, --ip, --topic, --id, --from-id/--to-id")
    if not reason or not reason.strip():
        raise click.UsageError("--reason is required (it is recorded with the erasure)")
    kind, value = chosen[0]
    try:
        selector = subjects.Selector(kind, value)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    conn = _open(db) if yes else _read_only(db)
    try:
        ids = list(subjects.select(conn, selector))
        outcome = erasure.Outcome([])
        found = [] if yes else erasure.tampered(conn, ids)  # with --yes, erase() checks them first
        if found:
            raise erasure.Tampered(found)
        if yes:
            digest = erasure.selector_digest(_selector_key(signing_key, db), kind, value) if ids else None
            key = _record_key(signing_key, db) if ids else None
            outcome = erasure.erase(conn, ids, "request", reason.strip(), digest, clock.now(), key=key)
    except erasure.Tampered as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        conn.close()
    _report(outcome, f"--{kind}", not yes, ids, db)


@click.command(context_settings=CONTEXT)
@db_option
@signing_key_option
@click.option(
    "--older-than",
    envvar="TOPIC_AUDIT_RETAIN_OLDER_THAN",
    show_envvar=True,
    required=True,
    help="Erase the content of entries received longer ago than this: 90d, 12h, 30m, 2s.",
)
def retain(db: Path, signing_key: Path | None, older_than: str) -> None:
    """Erase the content of entries older than --older-than now (what `serve` does every hour with
    TOPIC_AUDIT_RETENTION_DAYS), in records of at most 500 entries."""
    from topic_audit.privacy import erasure, subjects

    try:
        age = subjects.parse_duration(older_than)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    conn = _open(db)
    try:
        outcome = erasure.retain(conn, age, clock.now(), key=_record_key(signing_key, db))
    except erasure.Tampered as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        conn.close()
    _purge_status(
        f"retention: erased {outcome.entries} entries older than {older_than} in {len(outcome.records)} records",
        outcome,
        db,
    )
    sys.stdout.flush()
