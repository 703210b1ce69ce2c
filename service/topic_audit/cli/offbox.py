"""The off-box copy's commands: ``restore`` (from the replica) and ``watch`` (continuous verification)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from topic_audit.cli.options import CONTEXT, checkpoint_file_option, pinned_key
from topic_audit.settings import SettingsError


def _replica_options(f: Any) -> Any:
    f = click.option(
        "--litestream",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="TOPIC_AUDIT_LITESTREAM",
        show_envvar=True,
        help="The litestream binary. [default: on PATH, or beside this Python]",
    )(f)
    f = click.option(
        "--replica-endpoint",
        envvar="TOPIC_AUDIT_REPLICA_ENDPOINT",
        show_envvar=True,
        help="Endpoint of the S3-compatible store. [default: AWS S3]",
    )(f)
    return click.option(
        "--replica-url",
        envvar="TOPIC_AUDIT_REPLICA_URL",
        show_envvar=True,
        required=True,
        help="s3://bucket/prefix the replica was written to (as for serve). Required.",
    )(f)


@click.command(context_settings=CONTEXT)
@click.option(
    "--to",
    "to",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TOPIC_AUDIT_RESTORE_TO",
    show_envvar=True,
    required=True,
    help="Where to write the restored database (it must not exist); the published checkpoints go to "
    "PATH.checkpoints.jsonl beside it. Required.",
)
@click.option(
    "--timestamp",
    envvar="TOPIC_AUDIT_RESTORE_TIMESTAMP",
    show_envvar=True,
    help="Restore the database as it was at this time (RFC 3339, e.g. 2026-12-01T10:00:00Z; Litestream's "
    "point-in-time restore). [default: the newest]",
)
@_replica_options
def restore(
    to: Path, timestamp: str | None, replica_url: str, replica_endpoint: str | None, litestream: Path | None
) -> None:
    """Restore the database from its off-box replica, with the published signed checkpoints.

    Then check it: topic-audit verify --db PATH (add --public-key to pin the signer).
    """
    from topic_audit.offbox import replica

    for path in (to, to.with_name(to.name + ".checkpoints.jsonl"), Path(f"{to}-wal")):
        if path.exists():
            raise click.ClickException(f"{path} exists; restore writes a new file (move it away first)")
    try:
        target = replica.Target.parse(replica_url, replica_endpoint)
        started = time.perf_counter()
        restored = replica.restore(target, to, timestamp, litestream)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    recovered = f" and {restored.recovered} newer from the restored copy" if restored.recovered else ""
    click.echo(
        f"restored {replica_url} to {to} and {restored.published} published checkpoints{recovered} to "
        f"{to}.checkpoints.jsonl in {time.perf_counter() - started:.1f} s; now: topic-audit verify --db {to}"
    )
    if (stopped := restored.not_recovered) is not None:
        click.echo(f"not recovered from the restored copy: {stopped.check}: {stopped.message}", err=True)


@click.command(context_settings=CONTEXT)
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TOPIC_AUDIT_DB",
    default=Path("data/audit.db"),
    show_default=True,
    show_envvar=True,
    help="The log to watch: the live file or a restored copy (read-only).",
)
@checkpoint_file_option
@click.option(
    "--public-key",
    envvar="TOPIC_AUDIT_PUBLIC_KEY",
    show_envvar=True,
    help="Pin the checkpoint signer: raw hex or a PEM file. [default: the first checkpoint's key]",
)
@click.option(
    "--interval",
    type=click.FloatRange(0.1),
    default=10.0,
    show_default=True,
    envvar="TOPIC_AUDIT_WATCH_INTERVAL",
    show_envvar=True,
    help="Seconds between rounds.",
)
@click.option(
    "--sweep-entries",
    type=click.IntRange(1),
    default=10_000,
    show_default=True,
    envvar="TOPIC_AUDIT_WATCH_SWEEP_ENTRIES",
    show_envvar=True,
    help="Older entries re-verified each round (an old entry altered behind the triggers is found within "
    "entries ÷ this rounds).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=9108,
    show_default=True,
    envvar="TOPIC_AUDIT_WATCH_METRICS_PORT",
    show_envvar=True,
    help="Serve Prometheus metrics on this port (0: none).",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    envvar="TOPIC_AUDIT_WATCH_METRICS_HOST",
    show_envvar=True,
    help="Address of the metrics endpoint.",
)
@click.option(
    "--rounds",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    envvar="TOPIC_AUDIT_WATCH_ROUNDS",
    show_envvar=True,
    help="Stop after this many rounds, exiting 1 if anything was found (0: run until stopped).",
)
def watch(
    db: Path,
    checkpoint_file: Path | None,
    public_key: str | None,
    interval: float,
    sweep_entries: int,
    metrics_port: int,
    metrics_host: str,
    rounds: int,
) -> None:
    """Verify a log continuously: what was appended since the last round, the new checkpoints, and a
    rolling sweep of older entries; serves /metrics (topic_audit_watch_findings is 0 while intact)."""
    from prometheus_client import start_http_server

    from topic_audit.integrity.watch import Watch
    from topic_audit.settings import Settings, configure_logging

    configure_logging("info")
    if not db.exists():
        raise click.ClickException(f"{db} does not exist")
    pinned = pinned_key(public_key)
    watcher = Watch(
        db, Settings(db=db, checkpoint_file=checkpoint_file).checkpoint_path, pinned, sweep_entries
    )
    if metrics_port:
        start_http_server(metrics_port, metrics_host, registry=watcher.metrics.registry)
        click.echo(f"watch metrics on http://{metrics_host}:{metrics_port}/metrics", err=True)
    done = 0
    try:
        while True:
            result = watcher.round()
            done += 1
            swept = f"{result.swept[0] + 1}..{result.swept[1]}" if result.swept[1] else "nothing yet"
            click.echo(
                f"round {done}: {result.new_entries} new entries, swept {swept}, "
                f"{result.new_checkpoints} new checkpoints, {result.new_deliveries} new deliveries, "
                f"{len(watcher.findings)} findings, {result.seconds:.3f} s",
                err=True,
            )
            if rounds and done >= rounds:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    sys.exit(1 if watcher.findings else 0)
