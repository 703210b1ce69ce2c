"""`topic-audit serve`: the receiver, in one process or several."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from topic_audit.cli.options import CONTEXT, checkpoint_file_option, db_option, signing_key_option
from topic_audit.settings import Settings, SettingsError


@click.command(context_settings=CONTEXT)
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
@db_option
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
@checkpoint_file_option
@signing_key_option
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
