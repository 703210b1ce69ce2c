"""The forwarding commands: ``replay`` (queue deliveries again) and ``sink`` (a demo destination)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click

from topic_audit import clock
from topic_audit.cli.options import CONTEXT, db_option, forward_url_option, retry_schedule_option
from topic_audit.log.database import TOOL_TIMEOUT_SECONDS, connect
from topic_audit.settings import SettingsError, check_destination


def _destination(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            check_destination(value, "--destination")
        except SettingsError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


@click.command(context_settings=CONTEXT)
@db_option
@click.option(
    "--failed",
    is_flag=True,
    envvar="TOPIC_AUDIT_REPLAY_FAILED",
    show_envvar=True,
    help="Queue again every delivery that exhausted its retry schedule (narrowed by the options below).",
)
@click.option(
    "--id",
    "entry_id",
    type=click.IntRange(1),
    envvar="TOPIC_AUDIT_REPLAY_ID",
    show_envvar=True,
    help="Queue the delivery of this audit_log entry again.",
)
@click.option(
    "--from-id",
    type=click.IntRange(1),
    envvar="TOPIC_AUDIT_REPLAY_FROM_ID",
    show_envvar=True,
    help="Queue the deliveries of the entries from this id (with --to-id).",
)
@click.option(
    "--to-id",
    type=click.IntRange(1),
    envvar="TOPIC_AUDIT_REPLAY_TO_ID",
    show_envvar=True,
    help="… to this id, inclusive.",
)
@click.option(
    "--destination",
    callback=_destination,
    envvar="TOPIC_AUDIT_REPLAY_DESTINATION",
    show_envvar=True,
    help="Only this destination (it need not be configured: a new handler can be sent the past). "
    "[default: every destination of TOPIC_AUDIT_FORWARD_URL; with --failed, every failed one]",
)
@forward_url_option("The configured destinations (as for serve).")
def replay(
    db: Path,
    failed: bool,
    entry_id: int | None,
    from_id: int | None,
    to_id: int | None,
    destination: str | None,
    forward_url: tuple[str, ...],
) -> None:
    """Queue deliveries to the app's handler again; `serve` (with forwarding) attempts them at once,
    recording each attempt with replay = 1.

    Before-callbacks are never replayed (their answer was due within 2 s), nor requests rejected before
    the signature check.
    """
    from topic_audit.forwarding import outbox

    if entry_id is not None:
        if from_id is not None or to_id is not None:
            raise click.UsageError("give --id or --from-id/--to-id, not both")
        from_id = to_id = entry_id
    if (from_id is None) != (to_id is None):
        raise click.UsageError("--from-id and --to-id go together")
    ids = (from_id, to_id) if from_id is not None and to_id is not None else None
    if ids is not None and ids[0] > ids[1]:
        raise click.UsageError("--from-id must not be larger than --to-id")
    if not failed and ids is None:
        raise click.UsageError("say what to replay: --failed, --id N, or --from-id A --to-id B")
    if not db.exists():
        raise click.ClickException(f"{db} does not exist")
    conn = connect(db, timeout=TOOL_TIMEOUT_SECONDS)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'outbox'").fetchone():
            raise click.ClickException(f"{db} has no outbox yet: run `topic-audit migrate`")
        if destination is not None:
            destinations: list[str] = [destination]
        elif failed:
            destinations = [
                r[0] for r in conn.execute("SELECT DISTINCT destination FROM outbox WHERE state = 'failed'")
            ]
        else:
            destinations = list(forward_url)
            if not destinations:
                raise click.UsageError("no destination: set TOPIC_AUDIT_FORWARD_URL or give --destination")
        queued = outbox.replay(conn, destinations, clock.now(), failed_only=failed, ids=ids)
    finally:
        conn.close()
    if not queued:
        click.echo(
            "nothing to replay (Before-callbacks and requests rejected before the signature check are never forwarded)"
        )
        return
    click.echo(
        f"queued {queued} deliveries again to {', '.join(destinations)}; a running `topic-audit serve` with "
        "forwarding attempts them now"
    )


@click.command("rebuild-outbox", context_settings=CONTEXT)
@db_option
@forward_url_option("The configured destinations (as for serve): every forwardable entry is owed to each.")
@retry_schedule_option
def rebuild_outbox(db: Path, forward_url: tuple[str, ...], forward_retry_schedule: tuple[int, ...]) -> None:
    """Set the outbox to what the log and the deliveries say (it is derived data, like topics):
    delivered, failed, or pending and due now. Stop serve first."""
    from topic_audit.forwarding import outbox

    try:
        for url in forward_url:
            check_destination(url, "TOPIC_AUDIT_FORWARD_URL")
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    if not db.exists():
        raise click.ClickException(f"{db} does not exist")
    conn = connect(db, timeout=TOOL_TIMEOUT_SECONDS)
    try:
        rows = outbox.rebuild(conn, forward_url, forward_retry_schedule, clock.now())
        states = dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())
    finally:
        conn.close()
    click.echo(
        f"rebuilt the outbox of {db}: {rows} rows; "
        + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    )


@click.command(context_settings=CONTEXT)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    envvar="TOPIC_AUDIT_SINK_HOST",
    show_envvar=True,
    help="Address to listen on.",
)
@click.option(
    "--port",
    type=int,
    default=8002,
    show_default=True,
    envvar="TOPIC_AUDIT_SINK_PORT",
    show_envvar=True,
    help="Port to listen on (0: one the system picks, said on start-up).",
)
@click.option(
    "--veto",
    is_flag=True,
    envvar="TOPIC_AUDIT_SINK_VETO",
    show_envvar=True,
    help="Answer Before-callbacks with ErrorCode 1 (the user's operation is refused).",
)
def sink(host: str, port: int, veto: bool) -> None:
    """A stand-in for the app's own callback handler: prints every callback forwarded to it and answers
    OK (checking the re-computed Sign when TOPIC_AUDIT_TOKEN is set)."""
    from topic_audit.demo.sink import serve as serve_sink

    with contextlib.suppress(KeyboardInterrupt):
        serve_sink(host, port, os.environ.get("TOPIC_AUDIT_TOKEN") or None, veto)
