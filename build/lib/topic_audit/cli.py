"""The ``topic-audit`` command line. Every option has help text and an environment variable."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import click

from topic_audit import migrations, samples
from topic_audit.settings import Settings, SettingsError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _checkpoint_file_option(f: Any) -> Any:
    return click.option(
        "--checkpoint-file",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="TOPIC_AUDIT_CHECKPOINT_FILE",
        show_envvar=True,
        help="The signed checkpoint file, outside the database. [default: <db>.checkpoints.jsonl]",
    )(f)


def _signing_key_option(f: Any) -> Any:
    return click.option(
        "--signing-key",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="TOPIC_AUDIT_SIGNING_KEY",
        show_envvar=True,
        help="Ed25519 key (PEM) that signs checkpoints; created 0600 when absent. "
        "[default: checkpoint-signing.key beside the database]",
    )(f)


def _db_option(f: Any) -> Any:
    return click.option(
        "--db",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="TOPIC_AUDIT_DB",
        default=Path("data/audit.db"),
        show_default=True,
        show_envvar=True,
        help="The SQLite audit database.",
    )(f)


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="topic-audit")
def main() -> None:
    """topic-audit: the audited webhook target for Tencent Cloud Chat topic callbacks."""


@main.command(context_settings=CONTEXT)
@click.option(
    "--host",
    envvar="TOPIC_AUDIT_HOST",
    default="127.0.0.1",
    show_default=True,
    show_envvar=True,
    help="Address to bind the receiver to.",
)
@click.option(
    "--port",
    envvar="TOPIC_AUDIT_PORT",
    default=8000,
    type=int,
    show_default=True,
    show_envvar=True,
    help="Port to bind the receiver to.",
)
@_db_option
@click.option(
    "--sdkappid",
    envvar="TOPIC_AUDIT_SDKAPPID",
    show_envvar=True,
    help="The app's SDKAppID; callbacks for any other app are rejected. Required.",
)
@click.option(
    "--callback-path",
    envvar="TOPIC_AUDIT_CALLBACK_PATH",
    default="/callback",
    show_default=True,
    show_envvar=True,
    help="The webhook route.",
)
@click.option(
    "--max-body-bytes",
    envvar="TOPIC_AUDIT_MAX_BODY_BYTES",
    default=65536,
    type=int,
    show_default=True,
    show_envvar=True,
    help="Larger bodies are rejected (413) and still audited.",
)
@click.option(
    "--sign-tolerance-seconds",
    envvar="TOPIC_AUDIT_SIGN_TOLERANCE_SECONDS",
    default=60,
    type=int,
    show_default=True,
    show_envvar=True,
    help="Allowed distance between RequestTime and now when a token is set.",
)
@click.option(
    "--max-batch",
    envvar="TOPIC_AUDIT_MAX_BATCH",
    default=256,
    type=int,
    show_default=True,
    show_envvar=True,
    help="Most rows committed in one transaction (group commit).",
)
@click.option(
    "--body-timeout-seconds",
    envvar="TOPIC_AUDIT_BODY_TIMEOUT_SECONDS",
    default=5,
    type=click.IntRange(1),
    show_default=True,
    show_envvar=True,
    help="A request body must arrive within this time, or it is answered 408 (and recorded).",
)
@click.option(
    "--allow-unauthenticated",
    is_flag=True,
    envvar="TOPIC_AUDIT_ALLOW_UNAUTHENTICATED",
    show_envvar=True,
    help="Allow a non-loopback --host without TOPIC_AUDIT_TOKEN (only behind another layer that "
    "authenticates Tencent).",
)
@click.option(
    "--checkpoint-seconds",
    envvar="TOPIC_AUDIT_CHECKPOINT_SECONDS",
    default=60,
    type=click.IntRange(0),
    show_default=True,
    show_envvar=True,
    help="Sign a checkpoint this often, even when idle (0: off).",
)
@_checkpoint_file_option
@_signing_key_option
@click.option(
    "--workers",
    envvar="TOPIC_AUDIT_WORKERS",
    default=1,
    type=click.IntRange(1, 64),
    show_default=True,
    show_envvar=True,
    help="Receiver processes, each with its own writer, all appending to one chain (on 2 cores 1 keeps "
    "the tail latency lowest: README, Performance).",
)
@click.option(
    "--server",
    "server_name",
    envvar="TOPIC_AUDIT_SERVER",
    default="uvicorn",
    show_default=True,
    show_envvar=True,
    type=click.Choice(["uvicorn", "granian"]),
    help="HTTP server: uvicorn answers a lone request sooner; granian carries more concurrent load "
    "(README, Performance).",
)
@click.option(
    "--log-level",
    envvar="TOPIC_AUDIT_LOG_LEVEL",
    default="info",
    show_default=True,
    show_envvar=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log level of the service.",
)
def serve(
    host: str,
    port: int,
    db: Path,
    sdkappid: str | None,
    callback_path: str,
    max_body_bytes: int,
    sign_tolerance_seconds: int,
    max_batch: int,
    body_timeout_seconds: int,
    allow_unauthenticated: bool,
    checkpoint_seconds: int,
    checkpoint_file: Path | None,
    signing_key: Path | None,
    workers: int,
    server_name: str,
    log_level: str,
) -> None:
    """Run the receiver.

    The token is read only from the environment (TOPIC_AUDIT_TOKEN), never from the command line, so that
    it does not show in process listings or shell history. When it is set, every callback must carry a
    valid Sign and RequestTime.
    """
    import os

    if not sdkappid:
        raise click.UsageError("the app's SDKAppID is required: --sdkappid or TOPIC_AUDIT_SDKAPPID")
    from topic_audit.explore import is_loopback

    if not os.environ.get("TOPIC_AUDIT_TOKEN") and not is_loopback(host) and not allow_unauthenticated:
        raise click.UsageError(
            f"refusing to listen on {host} without callback authentication: set TOPIC_AUDIT_TOKEN (the token "
            "from the IM console), or pass --allow-unauthenticated if another layer authenticates Tencent"
        )
    try:
        settings = Settings(
            sdk_app_id=sdkappid,
            token=os.environ.get("TOPIC_AUDIT_TOKEN") or None,
            sign_tolerance_seconds=sign_tolerance_seconds,
            db=db,
            host=host,
            port=port,
            callback_path=callback_path,
            max_body_bytes=max_body_bytes,
            max_batch=max_batch,
            body_timeout_seconds=body_timeout_seconds,
            allow_unauthenticated=allow_unauthenticated,
            checkpoint_seconds=checkpoint_seconds,
            checkpoint_file=checkpoint_file,
            signing_key=signing_key,
        )
        settings.validate()
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    auth = (
        "Sign/RequestTime required"
        if settings.token
        else "NO callback authentication (TOPIC_AUDIT_TOKEN unset)"
    )
    click.echo(
        f"topic-audit receiver on http://{host}:{port}{callback_path} for SdkAppid {sdkappid}; {auth}; "
        f"audit log {db}",
        err=True,
    )
    if workers == 1 and server_name == "uvicorn":
        import uvicorn

        from topic_audit.app import create_app

        uvicorn.run(
            create_app(settings),
            host=host,
            port=port,
            access_log=False,
            log_level=log_level,
            server_header=False,
        )
        return
    _serve_in_workers(settings, workers, server_name, log_level)


def _serve_in_workers(settings: Settings, workers: int, server_name: str, log_level: str) -> None:
    """Serve from worker processes, which build the app from the environment (topic_audit.app.from_environment).

    What must happen once happens here first: migrations and the signing key. Several workers share
    their metrics through a fresh PROMETHEUS_MULTIPROC_DIR, removed on exit.
    """
    import os
    import shutil
    import tempfile

    from topic_audit.checkpoints import Signer
    from topic_audit.migrations import migrate
    from topic_audit.settings import WORKER_SETTINGS

    # Before anything imports prometheus_client: it picks its storage when first imported, and a
    # server that forks its workers hands them this process's modules.
    metrics_dir = tempfile.mkdtemp(prefix="topic-audit-metrics-") if workers > 1 else None
    if metrics_dir is not None:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    migrate(settings.db)
    if settings.checkpoint_seconds:
        Signer.load_or_create(settings.signing_key_path)
    os.environ[WORKER_SETTINGS] = settings.for_workers()
    os.environ["TOPIC_AUDIT_LOG_LEVEL"] = log_level
    try:
        if server_name == "granian":
            from granian.constants import Interfaces
            from granian.log import LogLevels
            from granian.server import Server

            Server(
                "topic_audit.app:from_environment",
                address=settings.host,
                port=settings.port,
                interface=Interfaces.ASGI,
                workers=workers,
                factory=True,
                websockets=False,
                log_access=False,
                log_level=LogLevels(log_level),
                respawn_failed_workers=True,
            ).serve()
        else:
            import uvicorn

            uvicorn.run(
                "topic_audit.app:from_environment",
                factory=True,
                workers=workers,
                host=settings.host,
                port=settings.port,
                access_log=False,
                log_level=log_level,
                server_header=False,
            )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@main.command(context_settings=CONTEXT)
@click.option(
    "--url",
    envvar="TOPIC_AUDIT_SEND_URL",
    default="http://127.0.0.1:8000/callback",
    show_default=True,
    show_envvar=True,
    help="The receiver's callback URL.",
)
@click.option(
    "--sdkappid",
    envvar="TOPIC_AUDIT_SDKAPPID",
    required=True,
    show_envvar=True,
    help="SDKAppID to put in the query string.",
)
@click.option(
    "--sample",
    "sample_names",
    multiple=True,
    type=click.Choice(sorted(samples.SAMPLES)),
    envvar="TOPIC_AUDIT_SEND_SAMPLE",
    show_envvar=True,
    help="A documented sample to send (repeatable). Default: the topic lifecycle "
    "before-create, after-create, info-changed, destroyed.",
)
@click.option(
    "--file",
    "file",
    type=click.File("rb"),
    envvar="TOPIC_AUDIT_SEND_FILE",
    show_envvar=True,
    help="Send this JSON body instead of samples ('-' for stdin); its CallbackCommand is used.",
)
@click.option(
    "--unique/--no-unique",
    default=True,
    show_default=True,
    envvar="TOPIC_AUDIT_SEND_UNIQUE",
    show_envvar=True,
    help="Give each run its own TopicId so that samples are new topics, not redeliveries.",
)
@click.option(
    "--count",
    default=1,
    type=click.IntRange(1),
    show_default=True,
    envvar="TOPIC_AUDIT_SEND_COUNT",
    show_envvar=True,
    help="Send everything this many times.",
)
@click.option(
    "--rate",
    type=click.FloatRange(0),
    envvar="TOPIC_AUDIT_SEND_RATE",
    show_envvar=True,
    help="Load mode: deliveries per second (0: as fast as the connections allow).",
)
@click.option(
    "--duration",
    type=click.FloatRange(0.1),
    envvar="TOPIC_AUDIT_SEND_DURATION",
    show_envvar=True,
    help="Load mode: how long to send, in seconds. [default: 10 when --rate is given]",
)
@click.option(
    "--concurrency",
    default=8,
    type=click.IntRange(1, 1024),
    show_default=True,
    envvar="TOPIC_AUDIT_SEND_CONCURRENCY",
    show_envvar=True,
    help="Load mode: connections in flight at once.",
)
@click.option(
    "--mix",
    default="good=90,duplicate=5,bad=5",
    show_default=True,
    envvar="TOPIC_AUDIT_SEND_MIX",
    show_envvar=True,
    help="Load mode: weights of good deliveries (topic lifecycles), duplicates (Tencent retries) and bad "
    "ones (wrong signature, malformed JSON, wrong app id, invalid payload).",
)
def send(
    url: str,
    sdkappid: str,
    sample_names: tuple[str, ...],
    file: Any,
    unique: bool,
    count: int,
    rate: float | None,
    duration: float | None,
    concurrency: int,
    mix: str,
) -> None:
    """Sign and post Tencent-style callbacks, printing each answer.

    With --rate or --duration, send steady load instead and print a summary (statuses, latency
    percentiles). Signs with TOPIC_AUDIT_TOKEN when it is set (read from the environment only).
    """
    import os

    import httpx

    token = os.environ.get("TOPIC_AUDIT_TOKEN") or None
    if rate is not None or duration is not None:
        from topic_audit import load

        try:
            weights = load.parse_mix(mix)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--mix") from None
        report = load.run_blocking(
            url=url,
            sdk_app_id=sdkappid,
            token=token,
            rate=rate or 0.0,
            duration=duration or 10.0,
            concurrency=concurrency,
            mix=weights,
        )
        click.echo(report.summary())
        if report.sent == 0 or report.errors:
            sys.exit(1)
        return
    if file is not None:
        raw = file.read()
        try:
            command = json.loads(raw).get("CallbackCommand", "")
        except (ValueError, AttributeError):
            command = ""
        bodies = [(command, raw)]
    else:
        names = sample_names or ("before-create", "after-create", "info-changed", "destroyed")
        suffix = f"{int(time.time() * 1000):x}" if unique else ""
        bodies = [
            (samples.SAMPLES[n]["CallbackCommand"], _encode(_uniquify(samples.sample(n), suffix)))
            for n in names
        ]
    failures = 0
    with httpx.Client(timeout=5.0) as client:
        for _ in range(count):
            for command, body in bodies:
                target = f"{url}?{samples.query(sdkappid, command, token)}"
                try:
                    response = client.post(target, content=body, headers={"content-type": "application/json"})
                except httpx.HTTPError as exc:
                    raise click.ClickException(f"cannot reach {url}: {exc}") from None
                failures += response.status_code != 200
                click.echo(f"{response.status_code} {command or '(no command)'} {response.text}")
    if failures:
        sys.exit(1)


def _uniquify(body: dict[str, Any], suffix: str) -> dict[str, Any]:
    if not suffix:
        return body
    if "TopicId" in body:
        body["TopicId"] = f"{body['TopicId']}{suffix}"
    if "TopicIdList" in body:
        body["TopicIdList"] = [f"{t}{suffix}" for t in body["TopicIdList"]]
    return body


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


@main.command(context_settings=CONTEXT)
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
@_db_option
def explore(host: str, port: int, db: Path) -> None:
    """Serve the audit database read-only in Datasette, as `audit`, for auditors."""
    import asyncio

    import uvicorn

    from topic_audit.explore import AccessError, make_datasette

    migrations.migrate(db)
    try:
        ds = make_datasette(db, host)
    except AccessError as exc:
        raise click.UsageError(str(exc)) from None
    asyncio.run(ds.invoke_startup())
    click.echo(f"Datasette on http://{host}:{port}/audit (read-only view of {db})", err=True)
    uvicorn.run(ds.app(), host=host, port=port, log_level="warning")


@main.command("hash-password", context_settings=CONTEXT)
@click.password_option(
    envvar="TOPIC_AUDIT_AUDITOR_PASSWORD",
    show_envvar=True,
    help="The auditor's password (prompted for, never echoed).",
)
def hash_password(password: str) -> None:
    """Print the hash to put in TOPIC_AUDIT_AUDITOR_PASSWORD_HASH (Datasette login for user `auditor`)."""
    from datasette_auth_passwords.utils import hash_password as _hash

    click.echo(_hash(password))


@main.command(context_settings=CONTEXT)
@_db_option
def migrate(db: Path) -> None:
    """Create the database or bring its schema up to date."""
    migrations.migrate(db)
    click.echo(f"{db}: schema up to date")


@main.command("rebuild-projection", context_settings=CONTEXT)
@_db_option
def rebuild_projection(db: Path) -> None:
    """Rebuild the topics table from the audit log in one transaction.

    The log is replayed on every core first, outside any lock; then, in one short transaction, the
    topics that differ from the replay are rewritten. Readers keep seeing the old table until it
    commits; a running receiver waits only for that transaction.
    """
    from topic_audit import rebuild

    if not db.exists():
        raise click.ClickException(f"{db} does not exist")
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
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


@main.command(context_settings=CONTEXT)
@_db_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    envvar="TOPIC_AUDIT_VERIFY_JSON",
    show_envvar=True,
    help="Print the result as one JSON object (for automation).",
)
@_checkpoint_file_option
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
    from topic_audit.checkpoints import load_public_key

    file = Settings(db=db, checkpoint_file=checkpoint_file).checkpoint_path
    pinned = None
    if public_key:
        text = Path(public_key).read_text() if Path(public_key).is_file() else public_key
        try:
            pinned = load_public_key(text)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--public-key") from None
    from topic_audit import verify as checks

    if not db.exists():
        raise click.ClickException(f"{db} does not exist")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    started = time.perf_counter()
    try:
        total = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
        findings, count, head = checks.verify_all(conn, file, pinned, not as_json and total >= 100000)
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
                    "first_bad_id": checks.first_bad_id(findings),
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


@main.command(context_settings=CONTEXT)
@_db_option
@_checkpoint_file_option
@_signing_key_option
def checkpoint(db: Path, checkpoint_file: Path | None, signing_key: Path | None) -> None:
    """Sign a checkpoint of the log now (the receiver also does so every --checkpoint-seconds)."""
    from topic_audit.app import iso_now
    from topic_audit.checkpoints import Signer, make_checkpoint
    from topic_audit.writer import connect

    settings = Settings(db=db, checkpoint_file=checkpoint_file, signing_key=signing_key)
    if not db.exists():
        raise click.ClickException(f"{db} does not exist")
    signer, created = Signer.load_or_create(settings.signing_key_path)
    if created:
        click.echo(
            f"created signing key {settings.signing_key_path} (0600); export its public key with "
            "`topic-audit public-key`",
            err=True,
        )
    migrations.migrate(db)
    conn = connect(db)
    try:
        cp = make_checkpoint(conn, signer, settings.checkpoint_path, iso_now(time.time()))
    finally:
        conn.close()
    click.echo(
        f"checkpoint: {cp['log_size']} entries, head {cp['head_hash']}, digest {cp['digest']} "
        f"-> {settings.checkpoint_path}"
    )


@main.command("public-key", context_settings=CONTEXT)
@_db_option
@_signing_key_option
@click.option(
    "--hex",
    "as_hex",
    is_flag=True,
    envvar="TOPIC_AUDIT_PUBLIC_KEY_HEX",
    show_envvar=True,
    help="Print the raw key in hex instead of PEM.",
)
def public_key(db: Path, signing_key: Path | None, as_hex: bool) -> None:
    """Print the checkpoint signer's public key, for auditors to pin with `verify --public-key`."""
    from topic_audit.checkpoints import Signer

    path = Settings(db=db, signing_key=signing_key).signing_key_path
    if not path.exists():
        raise click.ClickException(f"no signing key at {path}; `topic-audit checkpoint` creates one")
    signer, _ = Signer.load_or_create(path)
    click.echo(signer.public_key_hex if as_hex else signer.public_key_pem().rstrip())


if __name__ == "__main__":  # pragma: no cover
    main()
